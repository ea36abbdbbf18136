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


if __name__ == "__main__":
    sys.exit(unittest.main())
