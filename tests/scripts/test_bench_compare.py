#!/usr/bin/env python3
"""ctest BenchCompare.*: scripts/bench_compare.py's ratios and verdicts on hand-made rows
(the numbers are chosen so each verdict is decided by the arithmetic, not by rounding)."""
import json
import os
import subprocess
import sys
import tempfile
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import bench_compare  # noqa: E402

GB = 1e9


def qlora(config, tps, peak, plan=1.0, model="llama-3.2-1b"):
    return {"bench": "train", "system": "qlora", "config": config, "model": model, "tokens_per_second": tps,
            "peak_allocated_bytes": peak, "plan_error_pct": plan}


def peer(config, mode, tps, peak, model="llama-3.2-1b"):
    return {"bench": "train", "system": "hf-peft-bnb", "config": config, "model": model, "mode": mode,
            "tokens_per_second": tps, "peak_allocated_bytes": peak}


class Verdicts(unittest.TestCase):
    def by_config(self, train, peers):
        return {r["config"]: r for r in bench_compare.compare(train, peers)}

    def test_ratios_and_targets(self):
        rows = self.by_config(
            [qlora("2x512", 30000, 1.5 * GB), qlora("4x1024", 50000, 3.0 * GB, plan=-12.0),
             qlora("8b-2x2048", 6000, 8 * GB, model="llama-3.1-8b")],
            [peer("2x512", "eager", 5000, 4 * GB), peer("2x512", "compile", 10000, 3 * GB),
             peer("4x1024", "eager", 20000, 9 * GB), peer("4x1024", "compile", 40000, 4 * GB),
             peer("8b-2x2048", "eager", 4000, 20 * GB, model="llama-3.1-8b"),
             peer("8b-2x2048", "compile", 4900, 12 * GB, model="llama-3.1-8b")])
        a = rows["2x512"]
        self.assertAlmostEqual(a["speed_vs_compiled"], 3.0)
        self.assertAlmostEqual(a["speed_vs_eager"], 6.0)
        self.assertAlmostEqual(a["memory_ratio"], 0.5)  # against the smaller peak (compiled, 3 GB)
        self.assertEqual((a["speed_verdict"], a["memory_verdict"], a["plan_verdict"]), ("met", "met", "met"))
        b = rows["4x1024"]
        self.assertAlmostEqual(b["speed_vs_compiled"], 1.25)
        self.assertAlmostEqual(b["memory_ratio"], 0.75)
        self.assertEqual((b["speed_verdict"], b["memory_verdict"], b["plan_verdict"]), ("missed", "missed", "missed"))
        c = rows["8b-2x2048"]
        self.assertEqual(c["speed_target"], 1.2)  # the 8B target, not the 1B one
        self.assertAlmostEqual(c["speed_vs_compiled"], 6000 / 4900)
        self.assertEqual(c["speed_verdict"], "met")

    def test_selective_row_stands_beside_the_peers_full_run_and_says_how_it_recomputed(self):
        sel = dict(qlora("selective-4x1024", 70000, 4 * GB), peer_config="4x1024", recompute_as_run="selective",
                   selective_layers=16)
        auto = dict(qlora("auto-4x1024", 50000, 6 * GB), peer_config="4x1024", recompute_as_run="full",
                    selective_layers=0)
        rows = self.by_config(
            [qlora("4x1024", 55000, 2 * GB), sel, auto],
            [peer("4x1024", "eager", 20000, 9 * GB), peer("4x1024", "compile", 40000, 8 * GB)])
        s = rows["selective-4x1024"]
        self.assertEqual(s["peer_config"], "4x1024")
        self.assertAlmostEqual(s["speed_vs_compiled"], 1.75)
        self.assertAlmostEqual(s["memory_ratio"], 0.5)
        self.assertEqual(s["speed_verdict"], "met (selective in 16 layers, vs the peer's 4x1024)")
        self.assertEqual(s["memory_verdict"], "met (selective in 16 layers, vs the peer's 4x1024)")
        a = rows["auto-4x1024"]
        self.assertEqual(a["speed_verdict"], "missed (full, vs the peer's 4x1024)")
        self.assertEqual(a["memory_verdict"], "missed (full, vs the peer's 4x1024)")
        self.assertEqual(rows["4x1024"]["speed_verdict"], "missed")  # the like-for-like row, untagged
        self.assertEqual(len(rows), 3)

    def test_layers_kept_whole_are_named_in_the_verdict(self):
        every = dict(qlora("auto-8x2048", 90000, 16 * GB), peer_config="8x2048", recompute_as_run="selective",
                     selective_layers=16, no_recompute_layers=16)
        some = dict(qlora("auto-some-8x2048", 85000, 12 * GB), peer_config="8x2048", recompute_as_run="selective",
                    selective_layers=16, no_recompute_layers=4)
        rows = self.by_config(
            [qlora("8x2048", 73000, 4 * GB), every, some],
            [peer("8x2048", "eager", 35000, 30 * GB), peer("8x2048", "compile", 59000, 28 * GB)])
        self.assertEqual(rows["auto-8x2048"]["speed_verdict"],
                         "met (nothing recomputed in 16 layers, vs the peer's 8x2048)")
        self.assertEqual(rows["auto-some-8x2048"]["memory_verdict"],
                         "met (nothing recomputed in 4 layers, selective in 12, vs the peer's 8x2048)")
        self.assertEqual(rows["auto-some-8x2048"]["speed_verdict"],
                         "missed (nothing recomputed in 4 layers, selective in 12, vs the peer's 8x2048)")

    def test_missing_or_failed_peer_is_not_run_never_met(self):
        rows = self.by_config(
            [qlora("2x512", 30000, 1.0 * GB), qlora("8x2048", 60000, 4 * GB)],
            [peer("2x512", "eager", 5000, 4 * GB),
             dict(peer("2x512", "compile", 0, 0), error="OutOfMemoryError: ...")])
        a = rows["2x512"]
        self.assertIsNone(a["speed_vs_compiled"])
        self.assertEqual(a["speed_verdict"], "not run")
        self.assertIsNone(a["memory_ratio"])  # one peer's peak alone does not decide the target
        self.assertEqual(a["memory_verdict"], "not run")
        self.assertIn("compile", a["errors"])
        self.assertEqual(rows["8x2048"]["speed_verdict"], "not run")

    def test_command_line_prints_the_table(self):
        with tempfile.TemporaryDirectory() as d:
            train, peers = os.path.join(d, "train.json"), os.path.join(d, "peer.json")
            with open(train, "w") as f:
                f.write('{"bench":"train_device","system":"qlora"}\n' + json.dumps(qlora("2x512", 20000, GB)) + "\n")
            with open(peers, "w") as f:
                f.write("progress text\n" + json.dumps(peer("2x512", "compile", 10000, 2 * GB)) + "\n")
            out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "bench_compare.py"), train, peers,
                                  "--json", os.path.join(d, "rows.json")], capture_output=True, text=True, check=True)
            self.assertIn("| 2x512", out.stdout)
            self.assertIn("2.00x", out.stdout)
            with open(os.path.join(d, "rows.json")) as f:
                self.assertEqual(json.loads(f.readline())["speed_verdict"], "met")

    def test_a_line_that_is_not_json_names_the_file_and_line(self):
        with tempfile.TemporaryDirectory() as d:
            bad = os.path.join(d, "bad.json")
            with open(bad, "w") as f:
                f.write('{"bench": "train",\n')
            out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "bench_compare.py"), bad, bad],
                                 capture_output=True, text=True)
            self.assertNotEqual(out.returncode, 0)
            self.assertIn("bad.json:1", out.stderr)


if __name__ == "__main__":
    unittest.main()
