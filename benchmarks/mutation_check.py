"""Mutation check (issue 15): does the suite catch wrong science?

Each mutant is one deliberate, science-critical bug: (file, exact old text, new text, the test
node ids that own it). The check copies the repository to a temporary directory, runs the
owning tests once unmutated (they must pass), then applies the mutants one at a time to the
copy and runs ``python -m pytest -x -q <owners>`` with ``PYTHONPATH`` at the copy; every mutant
must make a test *fail* (pytest exit status 1). A mutant whose anchor text is missing or not
unique, a collection error, or a timeout is an error, never a kill. It prints a table and
"killed K/N" and exits non-zero unless K == N.

    python -m benchmarks.mutation_check            # all mutants (~13 min on 2 cores)
    python -m benchmarks.mutation_check --list     # the mutants and their anchors checked, nothing run
    python -m benchmarks.mutation_check --only ring_ignores_n,eval_future

The list is also in docs/testing.md. Keep anchors short: they are re-checked on every run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCI = "tests/test_science.py::"
STATS = "tests/test_science_stats.py::"
VERDICTS = "tests/test_science_verdicts.py::"
STREAM = "tests/test_streaming_async_local.py::"
COMP = "tests/test_compression.py::"


@dataclass(frozen=True)
class Mutant:
    id: str
    what: str
    file: str
    old: str
    new: str
    owners: tuple[str, ...]


MUTANTS: list[Mutant] = [
    # -- the five of issue 15 ------------------------------------------------------------------
    Mutant("dist_sync_sums", "dist sync sums the ranks' gradients instead of averaging them",
           "experiments/procs/collectives.py", "p.grad.div_(comm.world)", "p.grad.div_(1)",
           ("tests/test_science_dist.py::test_dist_sync_is_plain_sgd_at_n_times_the_batch_and_evaluations_are_causal",)),
    Mutant("dist_local_sgd_sums", "dist local SGD sums the replicas instead of averaging them",
           "experiments/procs/collectives.py", "load_flat_state_(self.module, flat.div_(comm.world))",
           "load_flat_state_(self.module, flat)",
           ("tests/test_dist.py::test_local_sgd_reaches_target_and_average_is_the_mean",)),
    Mutant("diloco_no_momentum", "DiLoCo's outer step ignores momentum and Nesterov (update = delta)",
           "strategies/local_sgd.py",
           "update = delta.add(momentum_buf, alpha=outer.momentum) if outer.nesterov else momentum_buf",
           "update = delta",
           (SCI + "test_diloco_through_a_run_is_torch_nesterov_sgd_on_the_pseudo_gradient",)),
    Mutant("ring_ignores_n", "ring all-reduce time ignores N and halves the bytes",
           "experiments/cluster_model.py",
           "return 2 * (n_workers - 1) * net.latency_s + 2 * (n_workers - 1) / n_workers * nbytes / net.bytes_per_s",
           "return 2 * net.latency_s + nbytes / 2 / net.bytes_per_s",
           (SCI + "test_ring_allreduce_and_point_to_point_closed_forms",)),
    Mutant("eval_future", "the run loop evaluates half an interval in the future",
           "experiments/sim/run_loop.py", "if t_next <= min(k * every, budget):",
           "if t_next <= min((k + 0.5) * every, budget):",
           (SCI + "test_sim_evaluation_sees_exactly_the_updates_at_or_before_its_clock",)),
    Mutant("bootstrap_90", "bootstrap intervals computed at 90% and labelled 95%",
           "analysis/stats.py", "tail = (1 - level) / 2", "tail = (1 - 0.90) / 2",
           (STATS + "test_bootstrap_ratio_interval_has_the_normal_theory_width",)),
    # -- averaging and divisors ----------------------------------------------------------------
    Mutant("sim_sync_sums", "sim all-reduce sums gradients instead of averaging them",
           "experiments/sim/engine.py", "torch.stack(payloads).mean(dim=0)", "torch.stack(payloads).sum(dim=0)",
           (SCI + "test_sim_sync_at_n_workers_is_plain_sgd_at_n_times_the_batch",)),
    Mutant("backup_divides_by_n", "backup workers: the kept gradients divided by N, not by the kept count",
           "experiments/sim/engine.py", "torch.stack(payloads).mean(dim=0)",
           "torch.stack(payloads).sum(dim=0) / self.n",
           (SCI + "test_backup_workers_keep_the_first_gradients_and_divide_by_their_count",)),
    Mutant("batched_lead_only", "sim batched path: an update's gradient from the first kept worker's batch alone",
           "experiments/sim/engine.py", "self._batched_gradient(sorted(coll.payloads))",
           "self._batched_gradient(sorted(coll.payloads)[:1])",
           (SCI + "test_sim_sync_at_n_workers_is_plain_sgd_at_n_times_the_batch",)),
    # -- issue 23: the stacked path ------------------------------------------------------------
    Mutant("stacked_lead_gradient", "sim stacked path: every worker of a group gets the first worker's gradient",
           "experiments/sim/stacked.py", "else grads[name].unbind(0) for name in self.names",
           "else [grads[name][0]] * n for name in self.names",
           ("tests/test_stacked_sim.py::test_local_sgd_with_stragglers_agrees_and_stacks_what_is_in_flight",)),
    Mutant("stacked_ignores_counters", "sim stacked path: workers at other step counters share one vmapped call",
           "experiments/sim/compute_mode.py", "and (v.completed, v.steps) == key]  # in rank order",
           "]  # in rank order",
           ("tests/test_stacked_sim.py::test_async_with_stragglers_groups_only_workers_at_the_same_counters",)),
    Mutant("grouped_scalars_stale", "sim grouped step: the workers' scalar optimizer state (Adam's step count) not advanced",
           "experiments/sim/grouped_step.py", "rows.copy_(value.expand_as(rows))", "rows.add_(0)",
           ("tests/test_grouped_step.py::test_grouped_steps_are_bitwise_the_workers_own",)),
    Mutant("grouped_without_all", "sim grouped step: taken when fewer than N workers step at the instant",
           "experiments/sim/engine.py", "if len(ready) < self.n or not self.replicas.step():",
           "if not self.replicas.step():",
           ("tests/test_grouped_step.py::test_stragglers_step_each_worker_alone_and_agree",)),
    Mutant("local_sgd_divisor", "local SGD's global model: the replicas' sum over N + 1",
           "strategies/local_sgd.py", "torch.stack([flat_state(s) for s in sources]).mean(dim=0)",
           "torch.stack([flat_state(s) for s in sources]).sum(dim=0) / (len(sources) + 1)",
           (SCI + "test_local_sgd_global_model_between_rounds_is_the_replicas_mean",)),
    Mutant("backup_samples", "sync counts N workers' samples per update when backups dropped some",
           "strategies/sync.py", "lead.updates * lead.quorum * self.batch_size",
           "lead.updates * self.world * self.batch_size",
           (SCI + "test_backup_workers_keep_the_first_gradients_and_divide_by_their_count",)),
    Mutant("warmup_off_by_one", "post-local SGD runs one synchronous update too many",
           "strategies/local_sgd.py", "return self.sync_updates < self.options.warmup_sync_updates",
           "return self.sync_updates <= self.options.warmup_sync_updates",
           (SCI + "test_post_local_sgd_warmup_is_exactly_w_synchronous_updates",)),
    Mutant("buffers_not_averaged", "BatchNorm buffers never loaded from a reduction (each replica keeps its own)",
           "strategies/tensors.py", "b.copy_(flat[offset : offset + n].view_as(b))", "b.copy_(b)",
           ("tests/test_module_conformance.py::test_batchnorm_buffers_are_averaged",)),
    # -- async -----------------------------------------------------------------------------------
    Mutant("staleness_off_by_one", "staleness counted one too low",
           "strategies/async_ps.py", "staleness = self.version - pulled_version",
           "staleness = max(0, self.version - pulled_version - 1)",
           (SCI + "test_async_server_applies_lr_over_one_plus_staleness",)),
    Mutant("staleness_lr_wrong", "staleness_lr inverse uses lr / staleness instead of lr / (1 + staleness)",
           "strategies/async_ps.py", "1.0 / (1.0 + staleness)", "1.0 / max(1.0, staleness)",
           (SCI + "test_async_server_applies_lr_over_one_plus_staleness",)),
    Mutant("link_not_fifo", "the parameter server's link serves transfers at once (no queue)",
           "experiments/cluster_model.py", "start = max(request_t, self.free_at)", "start = request_t",
           (SCI + "test_sim_parameter_server_link_is_fifo_in_absolute_terms",)),
    Mutant("ring_bytes_halved", "ring all-reduce puts half the bytes on the wire",
           "experiments/cluster_model.py", "int(2 * (n_workers - 1) * nbytes)", "int((n_workers - 1) * nbytes)",
           (SCI + "test_ring_allreduce_and_point_to_point_closed_forms",)),
    # -- the clock and the budget -----------------------------------------------------------------
    Mutant("eval_after_budget", "the run loop processes events past the budget before its last evaluation",
           "experiments/sim/run_loop.py", "if t_next <= min(k * every, budget):", "if t_next <= k * every:",
           (SCI + "test_sim_evaluation_sees_exactly_the_updates_at_or_before_its_clock",)),
    Mutant("target_after_budget", "a target met after the budget counts as reached",
           "experiments/tta.py", "elif ev.clock_s > self.budget:", "elif ev.clock_s > self.budget + 1.0:",
           ("tests/test_backend_agreement.py::test_a_target_met_only_after_the_budget_is_not_reached",)),
    # -- data and stragglers ----------------------------------------------------------------------
    Mutant("shard_off_by_one", "worker w reads the shard of worker w + 1",
           "experiments/sharding.py", "perm[self.worker :: self.n_workers]", "perm[self.worker + 1 :: self.n_workers]",
           (SCI + "test_sim_sync_at_n_workers_is_plain_sgd_at_n_times_the_batch",)),
    Mutant("straggler_mean_not_one", "lognormal straggler factors without the -sigma^2/2 (mean exp(sigma^2/2))",
           "experiments/cluster_model.py", "self.rngs[worker].standard_normal() - cfg.sigma**2 / 2",
           "self.rngs[worker].standard_normal()",
           (SCI + "test_lognormal_stragglers_have_mean_one_and_the_configured_spread",)),
    Mutant("bimodal_p_flipped", "bimodal stragglers slow with probability 1 - p",
           "experiments/cluster_model.py", "random() < cfg.p else 1.0", "random() < 1 - cfg.p else 1.0",
           (SCI + "test_bimodal_stragglers_are_slow_with_probability_p",)),
    # -- statistics and the report ------------------------------------------------------------------
    Mutant("holm_not_monotone", "Holm without the step-down maximum",
           "analysis/stats.py", "running = max(running, min(1.0, (m - rank) * p[i]))",
           "running = min(1.0, (m - rank) * p[i])",
           (STATS + "test_holm_matches_statsmodels",)),
    Mutant("mann_whitney_two_sided", "Mann-Whitney one-sided p replaced by the two-sided one",
           "analysis/stats.py", "ceiling), alternative=alternative,", "ceiling), alternative=\"two-sided\",",
           (STATS + "test_mann_whitney_is_the_exact_permutation_test",)),
    Mutant("brown_forsythe_mean", "Brown-Forsythe centred on the mean (plain Levene)",
           "analysis/stats.py", "res = stats.levene(la, lb, center=\"median\")",
           "res = stats.levene(la, lb, center=\"mean\")",
           (STATS + "test_brown_forsythe_is_an_anova_on_absolute_deviations_from_the_medians",)),
    Mutant("claim_c_mirror_supported", "claim (c) reports the mirror case (sync less consistent) as supported",
           "analysis/claims.py", "row.verdict = REFUTED if ca == 0 else INCONCLUSIVE",
           "row.verdict = SUPPORTED if ca == 0 else INCONCLUSIVE",
           (VERDICTS + "test_claim_c_refuted_when_sync_is_the_less_consistent",)),
    Mutant("censored_at_budget", "a censored run counted at its budget instead of as slower than every reached run",
           "analysis/reader.py", "float(self.metrics[\"tta_s\"]) if self.reached else math.inf",
           "float(self.metrics[\"tta_s\"]) if self.reached else float(self.budget)",
           (VERDICTS + "test_a_censored_run_is_slower_than_every_reached_run_not_at_its_budget",)),
    Mutant("diverged_counted_censored", "the summary counts diverged runs as censored",
           "analysis/summary.py", "s.n_censored = s.n_seeds - s.n_reached - s.n_diverged",
           "s.n_censored = s.n_seeds - s.n_reached",
           (VERDICTS + "test_summary_counts_reached_censored_diverged_and_failed_runs_apart",)),
    # -- issue 24: streaming fragments, lr scaling with backup workers -------------------------
    Mutant("fragments_whole_tensors", "streaming DiLoCo cuts fragments only at tensor boundaries (unbalanced)",
           "strategies/streaming_diloco.py",
           "cut = nearest if abs(nearest - even) <= BALANCE_TOLERANCE * share else int(round(even))",
           "cut = nearest",
           ("tests/test_streaming_async_local.py::test_fragments_are_contiguous_and_equal_within_ten_percent",)),
    Mutant("lr_scaling_counts_backups", "lr scaling counts the dropped backup workers' batches in the effective batch",
           "strategies/sync.py", "return float(self.world - self.options.backup_workers)", "return float(self.world)",
           ("tests/test_contract.py::test_lr_scaling_with_backup_workers_counts_the_kept_gradients",)),
    # -- issue 24: the methods and options added since the list was written -------------------
    Mutant("streaming_schedule_shifted", "streaming DiLoCo syncs fragment p at (p + 2) H/P instead of (p + 1) H/P",
           "strategies/streaming_diloco.py", "return (step // self.gap - 1) % len(self.bounds)",
           "return (step // self.gap) % len(self.bounds)",
           (STREAM + "test_streaming_diloco_is_the_papers_algorithm_step_by_step",)),
    Mutant("streaming_overlap_late", "streaming DiLoCo applies an overlapped fragment tau + 1 steps after its start",
           "strategies/streaming_diloco.py", "self.pending = (fragment, handle, step + self.options.overlap_steps)",
           "self.pending = (fragment, handle, step + self.options.overlap_steps + 1)",
           (STREAM + "test_streaming_diloco_is_the_papers_algorithm_step_by_step",)),
    Mutant("streaming_mixing_mirrored", "streaming DiLoCo mixes alpha x local + (1 - alpha) x global (alpha mirrored)",
           "strategies/streaming_diloco.py", "local.mul_(1.0 - alpha).add_(outer, alpha=alpha)",
           "local.mul_(alpha).add_(outer, alpha=1.0 - alpha)",
           (STREAM + "test_streaming_diloco_is_the_papers_algorithm_step_by_step",)),
    Mutant("delayed_nesterov_period", "delayed Nesterov applies its momentum every N + 1 pushes",
           "strategies/async_local_sgd.py", "if count % period:", "if count % (period + 1):",
           (STREAM + "test_delayed_nesterov_against_torch_sgd",)),
    Mutant("dylu_reversed", "DyLU gives slow workers more local steps (the ratio inverted)",
           "strategies/async_local_sgd.py", "floor(h * fastest / f + 1e-9)", "floor(h * f / max(factors) + 1e-9)",
           (STREAM + "test_dynamic_local_steps_follow_speed",)),
    Mutant("topk_no_residual", "top-k drops what it did not send (no error feedback)",
           "strategies/compression.py", "self.residual = acc", "self.residual = torch.zeros_like(acc)",
           (COMP + "test_topk_error_feedback_carries_what_was_not_sent",)),
    Mutant("int8_scale_128", "int8 quantises with scale max|x| / 128 (the extreme value clipped)",
           "strategies/compression.py", ".float() / 127.0", ".float() / 128.0",
           (COMP + "test_int8_matches_a_numpy_per_tensor_quantiser_and_its_bound",)),
    Mutant("allgather_one_block", "the all-gather's time charges one block of bytes instead of N - 1",
           "experiments/cluster_model.py",
           "return (n_workers - 1) * net.latency_s + (n_workers - 1) * nbytes / net.bytes_per_s",
           "return (n_workers - 1) * net.latency_s + nbytes / net.bytes_per_s",
           (COMP + "test_sim_clock_charges_the_all_gather_and_the_codec",)),
    Mutant("codec_decodes_one", "a worker's codec charge decodes one payload where it decodes N",
           "strategies/compression.py", "value = [request.tensor] * world", "value = [request.tensor]",
           (COMP + "test_one_worker_of_n_decodes_n_payloads_and_returns_the_mean",
            COMP + "test_all_gather_codec_charge_grows_with_n")),
    Mutant("max_staleness_exclusive", "max_staleness refuses a gradient exactly at the bound",
           "strategies/async_ps.py", "staleness <= max_staleness", "staleness < max_staleness",
           (SCI + "test_async_server_refuses_gradients_staler_than_the_bound",)),
    Mutant("race_prunes_late", "the race pruner stops a trial one evaluation after it can no longer win",
           "sweeps/trials.py", "next_clock = (step + 1) * self.ctx.every_s", "next_clock = step * self.ctx.every_s",
           ("tests/test_sweeps.py::test_race_pruner_stops_trials_that_cannot_win_and_never_the_best",)),
    Mutant("claim_a_directions_swapped", "claim (a) tests the falling trend as the supporting one",
           "analysis/claims.py", 'spearman_trend(x, y, "greater"), spearman_trend(x, y, "less")',
           'spearman_trend(x, y, "less"), spearman_trend(x, y, "greater")',
           (VERDICTS + "test_claim_a_refuted_when_waiting_shrinks_with_n",
            "tests/test_report_stats.py::test_claim_a_supported_by_a_rising_wait_share_and_refuted_by_none_at_all")),
    Mutant("claim_b_wrong_side", "claim (b) supported only when the ratio's interval lies above 1",
           "analysis/claims.py", 'side == "below" and p_less <= ALPHA', 'side == "above" and p_less <= ALPHA',
           ("tests/test_report_stats.py::test_claim_b_counts_censored_async_runs_as_slower_not_as_their_budget",
            "tests/test_report_stats.py::test_claim_b_mixed_settings_are_inconclusive")),
    Mutant("claim_d_margin_10pct", "claim (d) allows 10% slower step times as 'without slowing training'",
           "analysis/claims.py", "SLOWDOWN_MARGIN = 1.05", "SLOWDOWN_MARGIN = 1.10",
           (VERDICTS + "test_claim_d_decides_at_its_five_percent_border",)),
    Mutant("claim_d_no_margin", "claim (d) tests step time on against off itself (no 5% margin)",
           "analysis/claims.py", "scaled = [[SLOWDOWN_MARGIN * x for x in off]", "scaled = [[x for x in off]",
           (VERDICTS + "test_claim_d_decides_at_its_five_percent_border",)),
    Mutant("threats_resolution_slowest", "the resolution threat compares eval.every_s with the slowest cell's TTA",
           "analysis/threats.py", "fastest = min(medians, key=lambda c: c.tta_median_s)",
           "fastest = max(medians, key=lambda c: c.tta_median_s)",
           (VERDICTS + "test_resolution_threat_measures_the_interval_against_the_fastest_cell",)),
    Mutant("dist_clock_keeps_last_pause", "the dist training clock excludes only the latest evaluation's pause",
           "experiments/procs/clock.py", "self.eval_total += spent", "self.eval_total = spent",
           ("tests/test_science_dist.py::test_dist_training_clock_stops_during_every_evaluation_pause",)),
]


def markdown_table(mutants: list[Mutant]) -> str:
    """The mutant list as docs/testing.md shows it (tests/test_docs.py keeps the two in step)."""
    lines = ["| mutant | the bug | file | owning tests |", "|---|---|---|---|"]
    for m in mutants:
        owners = "<br>".join(f"`{o.replace('tests/', '', 1)}`" for o in m.owners)
        lines.append(f"| `{m.id}` | {m.what} | `{m.file}` | {owners} |")
    return "\n".join(lines) + "\n"


def repo_files(root: Path) -> list[str]:
    """Tracked files plus untracked ones git does not ignore (what a checkout would test)."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=root,
                         check=True, capture_output=True).stdout.decode()
    return [f for f in out.split("\0") if f and (root / f).is_file()]


def copy_repo(root: Path, dest: Path) -> None:
    for rel in repo_files(root):
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / rel, target)


def check_anchor(root: Path, m: Mutant) -> str | None:
    """None when the mutant's old text occurs exactly once in its file; else why not."""
    path = root / m.file
    if not path.is_file():
        return f"{m.file} does not exist"
    count = path.read_text().count(m.old)
    if count != 1:
        return f"anchor found {count} times in {m.file} (must be exactly once): {m.old!r}"
    return None


def run_pytest(copy: Path, nodes: list[str], timeout_s: float) -> tuple[int, float, str]:
    env = {**os.environ, "PYTHONPATH": str(copy), "PYTHONDONTWRITEBYTECODE": "1"}
    t0 = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *nodes],
                              cwd=copy, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return -1, time.monotonic() - t0, "timeout"
    tail = (proc.stdout + proc.stderr).strip().splitlines()
    return proc.returncode, time.monotonic() - t0, tail[-1] if tail else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--list", action="store_true", help="print the mutants and exit")
    parser.add_argument("--markdown", action="store_true", help="print the mutants as docs/testing.md's table")
    parser.add_argument("--only", default="", help="comma-separated mutant ids")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per pytest run")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of the owners")
    args = parser.parse_args(argv)

    chosen = MUTANTS
    if args.only:
        wanted = {s.strip() for s in args.only.split(",") if s.strip()}
        unknown = wanted - {m.id for m in MUTANTS}
        if unknown:
            print(f"--only: unknown mutant ids {sorted(unknown)}", file=sys.stderr)
            return 2
        chosen = [m for m in MUTANTS if m.id in wanted]
    if args.markdown:
        print(markdown_table(chosen), end="")
        return 0
    if args.list:  # and every anchor checked (a moved file or edited line shows here, in a second)
        missing = 0
        for m in chosen:
            why = check_anchor(REPO, m)
            missing += why is not None
            print(f"{m.id:26s} {m.file:32s} {m.what}" + (f"\n{'':26s} ERROR {why}" if why else ""))
        return 1 if missing else 0

    errors = {m.id: why for m in chosen if (why := check_anchor(REPO, m))}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="syncbench-mutants-") as tmp:
        copy = Path(tmp) / "repo"
        copy_repo(REPO, copy)
        probe = subprocess.run([sys.executable, "-c", "import syncbench.strategies; print(syncbench.strategies.__file__)"], cwd=copy,
                               env={**os.environ, "PYTHONPATH": str(copy)}, capture_output=True, text=True)
        if not probe.stdout.strip().startswith(str(copy)):
            print(f"the copy is not what Python imports: {probe.stdout.strip() or probe.stderr.strip()}",
                  file=sys.stderr)
            return 2
        if not args.no_baseline:
            owners = sorted({n for m in chosen for n in m.owners})
            rc, secs, last = run_pytest(copy, owners, args.timeout * 2)
            print(f"baseline: {len(owners)} owning tests unmutated: exit {rc} in {secs:.0f} s ({last})", flush=True)
            if rc != 0:
                print("the owning tests fail without a mutant: fix them first", file=sys.stderr)
                return 2
        rows = []
        for m in chosen:
            if m.id in errors:
                rows.append((m, "ERROR", 0.0, errors[m.id]))
                print(f"{m.id:26s} ERROR     {errors[m.id]}", flush=True)
                continue
            path = copy / m.file
            original = path.read_text()
            path.write_text(original.replace(m.old, m.new, 1))
            try:
                rc, secs, last = run_pytest(copy, list(m.owners), args.timeout)
            finally:
                path.write_text(original)
            status = {0: "SURVIVED", 1: "killed"}.get(rc, "ERROR")
            detail = last if rc in (0, 1) else f"pytest exit {rc}: {last}"
            rows.append((m, status, secs, detail))
            print(f"{m.id:26s} {status:9s} {secs:5.0f} s  {detail}", flush=True)

    killed = sum(1 for r in rows if r[1] == "killed")
    print()
    print(f"| {'mutant':26s} | {'file':30s} | {'result':8s} | {'s':>4s} |")
    print(f"|{'-' * 28}|{'-' * 32}|{'-' * 10}|{'-' * 6}|")
    for m, status, secs, _ in rows:
        print(f"| {m.id:26s} | {m.file:30s} | {status:8s} | {secs:4.0f} |")
    print(f"\nkilled {killed}/{len(rows)} in {time.monotonic() - started:.0f} s")
    return 0 if killed == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
