#!/usr/bin/env python3
"""scripts/bench_report.py on fio JSON named as run.sh names it: the goals
table (ratios taken within one repetition, judged by their median), and the
host steal that run.sh records beside each run."""
import json
import os
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "scripts"))
import bench_report  # noqa: E402


def fio_json(path, iops, mean_us, write, submit_us):
    # mean_us is the total latency; completion latency leaves out submission.
    side = {"io_bytes": 4096, "iops": iops, "total_ios": 1000, "lat_ns": {"mean": mean_us * 1000},
            "clat_ns": {"mean": (mean_us - submit_us) * 1000, "percentile": {"50.000000": 1000, "99.000000": 2000}}}
    idle = {"io_bytes": 0, "iops": 0, "total_ios": 0, "clat_ns": {"mean": 0}}
    with open(path, "w") as f:
        json.dump({"jobs": [{"write": side if write else idle, "read": idle if write else side}]}, f)


class FioRuns(unittest.TestCase):
    """A directory of made-up runs."""

    def setUp(self):
        self.dir = tempfile.TemporaryDirectory()
        self.paths = []

    def tearDown(self):
        self.dir.cleanup()

    def add(self, target, job, qd, rep, iops, mean_us=100.0, submit_us=0.0, steal=None):
        path = os.path.join(self.dir.name, f"{target}-{job}-qd{qd}-r{rep}.json")
        fio_json(path, iops, mean_us, write=job != "randread", submit_us=submit_us)
        if steal is not None:
            with open(path[: -len(".json")] + ".steal", "w") as f:
                f.write(steal)
        self.paths.append(path)


class GoalsTest(FioRuns):
    def goal(self, prefix):
        rows = [g for g in bench_report.goals(bench_report.load(self.paths)) if g[0].startswith(prefix)]
        self.assertEqual(len(rows), 1, prefix)
        return rows[0]

    def test_ratio_is_taken_within_each_repetition(self):
        # Per sitting `defer` is 0.9x, 0.45x and 0.9x raw: median 0.9x. The
        # ratio of the medians (45k against 100k) would say 0.45x.
        for rep, raw, defer in ((1, 100_000, 90_000), (2, 100_000, 45_000), (3, 50_000, 45_000)):
            self.add("raw", "randread", 32, rep, raw)
            self.add("defer", "randread", 32, rep, defer)
        what, vals, bar, unit = self.goal("random reads QD32: `defer` ≥ 0.8× raw")
        self.assertEqual([round(v, 3) for v in vals], [0.9, 0.45, 0.9])
        self.assertEqual((bar, unit), (0.8, "×"))
        self.assertIn("| 0.90×, 0.45×, 0.90× | 0.90× | met |", bench_report.goals_markdown(bench_report.load(self.paths)))

    def test_median_decides_and_short_of_the_bar_is_not_met(self):
        for rep, ratio in ((1, 1.50), (2, 1.20), (3, 1.30)):
            self.add("workqueue", "randwrite-alloc", 16, rep, 10_000)
            self.add("defer", "randwrite-alloc", 16, rep, 10_000 * ratio)
        _, vals, _, _ = self.goal("allocating writes QD16: `defer` ≥ 1.35×")
        self.assertEqual(len(vals), 3)
        md = bench_report.goals_markdown(bench_report.load(self.paths))
        self.assertIn("| 1.50×, 1.20×, 1.30× | 1.30× | not met |", md)

    def test_latency_goal_is_a_difference_that_must_stay_within_the_bar(self):
        # Total latency: the 10 µs deferfs spends before fio's submission
        # returns count (completion latency alone would make them 5, 40, 8).
        for rep, auto in ((1, 45.0), (2, 80.0), (3, 48.0)):
            self.add("raw", "randread", 1, rep, 30_000, mean_us=30.0)
            self.add("auto", "randread", 1, rep, 20_000, mean_us=auto, submit_us=10.0)
        _, vals, bar, unit = self.goal("random reads QD1: `auto`")
        self.assertEqual([round(v) for v in vals], [15, 50, 18])
        self.assertEqual((bar, unit), (20.0, "µs"))
        self.assertIn("| +15 µs, +50 µs, +18 µs | +18 µs | met |",
                      bench_report.goals_markdown(bench_report.load(self.paths)))

    def test_a_repetition_missing_one_side_is_left_out(self):
        self.add("raw", "randwrite-overwrite", 16, 1, 60_000)
        self.add("auto", "randwrite-overwrite", 16, 1, 30_000)
        self.add("auto", "randwrite-overwrite", 16, 2, 60_000)  # no raw in repetition 2
        _, vals, _, _ = self.goal("random overwrites QD16: `auto`")
        self.assertEqual(vals, [0.5])
        self.assertIn("| 0.50× (1 of 2 repetitions) | 0.50× | not met |",
                      bench_report.goals_markdown(bench_report.load(self.paths)))

    def test_goals_the_run_did_not_measure_are_not_shown(self):
        self.add("raw", "randread", 32, 1, 100_000)
        self.add("inline", "randread", 32, 1, 90_000)
        self.assertEqual(bench_report.goals(bench_report.load(self.paths)), [])
        self.assertEqual(bench_report.goals_markdown(bench_report.load(self.paths)), "")


class StealTest(FioRuns):
    def test_each_repetition_shows_its_median_and_worst_run(self):
        for qd, steal in ((1, "0.5\n"), (16, "31.2\n"), (32, "2.0\n")):
            self.add("raw", "randread", qd, 1, 50_000, steal=steal)
        self.add("defer", "randread", 1, 2, 20_000, steal="1.0\n")
        md = bench_report.steal_markdown(bench_report.load(self.paths))
        self.assertIn("| 1 | 2.0 % | 31.2 % (raw randread QD16) | 1 of 3 |", md)
        self.assertIn("| 2 | 1.0 % | 1.0 % (defer randread QD1) | 0 of 1 |", md)

    def test_runs_without_a_record_add_nothing(self):
        self.add("raw", "randread", 1, 1, 50_000)
        self.add("defer", "randread", 1, 1, 20_000, steal="")  # /proc/stat did not move
        reps = bench_report.load(self.paths)
        self.assertNotIn("steal_pct", reps[("randread", "defer", 1)][0])
        self.assertEqual(bench_report.steal_markdown(reps), "")


if __name__ == "__main__":
    unittest.main()
