"""bench/compare.py's checks of the peers' environment (python3 standard library only)."""
import importlib.util
import os
import sys
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
SPEC = importlib.util.spec_from_file_location("compare", os.path.join(HERE, "..", "..", "bench", "compare.py"))
compare = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(compare)


class OpenBlasFallbackNote(unittest.TestCase):
    def with_flags(self, flags):
        saved = compare.cpu_flags
        compare.cpu_flags = lambda: set(flags)
        self.addCleanup(setattr, compare, "cpu_flags", saved)

    def test_generic_kernels_on_an_avx512_cpu_name_the_coretype_to_export(self):
        self.with_flags({"avx2", "avx512f"})
        note = compare.openblas_fallback_note({"as-set": "Prescott", "unset": "Prescott"})
        self.assertIn("generic Prescott kernels", note)
        self.assertIn("env as-set, unset", note)
        self.assertIn("OPENBLAS_CORETYPE=SkylakeX", note)

    def test_generic_kernels_on_an_avx2_cpu_name_haswell(self):
        self.with_flags({"avx2"})
        note = compare.openblas_fallback_note({"unset": "Core2", "as-set": "Haswell"})
        self.assertIn("env unset", note)
        self.assertIn("OPENBLAS_CORETYPE=Haswell", note)

    def test_recognized_cores_and_old_cpus_give_no_note(self):
        self.with_flags({"avx2", "avx512f"})
        self.assertIsNone(compare.openblas_fallback_note({"as-set": "SkylakeX", "unset": "Haswell"}))
        self.with_flags({"sse3"})
        self.assertIsNone(compare.openblas_fallback_note({"as-set": "Prescott"}))


def dry_run(argv):
    import contextlib
    import io
    out = io.StringIO()
    saved_argv = sys.argv
    try:
        sys.argv = ["compare.py", "--dry-run"] + argv
        with contextlib.redirect_stdout(out):
            try:
                compare.main()
            except SystemExit:
                pass
    finally:
        sys.argv = saved_argv
    return out.getvalue()


class ScalarIterations(unittest.TestCase):
    def test_chaingrad_runs_ten_times_the_peers_steps_unless_told(self):
        out = dry_run(["--workload", "scalar", "--peers", "torch", "--iters", "2000", "--chaingrad", "/bin/true"])
        cg = [l for l in out.splitlines() if "/bin/true bench scalar" in l]
        peer = [l for l in out.splitlines() if "scalar_autograd.py" in l]
        self.assertTrue(cg and peer, out)
        self.assertTrue(all("--iters 20000 " in l for l in cg), cg)
        self.assertTrue(all("--iters 2000 " in l for l in peer), peer)
        out = dry_run(["--workload", "scalar", "--peers", "torch", "--iters", "2000", "--cg-iters", "3000",
                       "--chaingrad", "/bin/true"])
        cg = [l for l in out.splitlines() if "/bin/true bench scalar" in l]
        self.assertTrue(cg and all("--iters 3000 " in l for l in cg), out)


class PeerBlasThreads(unittest.TestCase):
    def test_fewer_threads_than_cpus_give_the_peer_as_many_blas_threads(self):
        self.assertEqual(compare.peer_blas_prefix("match", 1, environ={}, cpus=2),
                         ["env", "OPENBLAS_NUM_THREADS=1"])
        self.assertEqual(compare.peer_blas_prefix("match", 3, environ={}, cpus=8),
                         ["env", "OPENBLAS_NUM_THREADS=3"])

    def test_all_cpus_an_exported_setting_or_own_leave_openblas_alone(self):
        self.assertEqual(compare.peer_blas_prefix("match", 2, environ={}, cpus=2), [])
        self.assertEqual(compare.peer_blas_prefix("match", 1, environ={"OPENBLAS_NUM_THREADS": "2"}, cpus=2), [])
        self.assertEqual(compare.peer_blas_prefix("own", 1, environ={}, cpus=2), [])

    def test_dry_run_of_one_thread_shows_the_prefix_on_the_peer_only(self):
        saved_env = os.environ.pop("OPENBLAS_NUM_THREADS", None)
        try:
            out = dry_run(["--workload", "mlp", "--batch", "64", "--threads", "1", "--peers", "torch",
                           "--chaingrad", "/bin/true"])
        finally:
            if saved_env is not None:
                os.environ["OPENBLAS_NUM_THREADS"] = saved_env
        lines = [l for l in out.splitlines() if "torch_mlp.py" in l or "/bin/true" in l]
        peer = [l for l in lines if "torch_mlp.py" in l]
        self.assertTrue(peer, out)
        if (os.cpu_count() or 1) > 1:
            self.assertTrue(all("OPENBLAS_NUM_THREADS=1" in l for l in peer), peer)
        self.assertFalse(any("OPENBLAS_NUM_THREADS" in l for l in lines if "/bin/true" in l), lines)


if __name__ == "__main__":
    sys.exit(unittest.main())
