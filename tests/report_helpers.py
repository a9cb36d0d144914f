"""Hand-made runs for the report's tests (test_frontier, test_reliability_sweep): a configuration's real flags
and id with the PPL and storage the test chooses. Kept apart from any test module so that each test file stands
on its own.
"""

from miq import methods
from miq.report.results import Run
from miq.run import config


def run(method: str, sparsity: str, wbits: str, bpw: float, ppl: float, seed: int = 0) -> Run:
    flags = methods.run_flags(methods.BY_ID[method], sparsity, wbits, None)
    cfg = config.parse(["toy", "synthetic", *flags, "--seed", str(seed)])
    rid = f"{method}_s{sparsity.replace(':', 'of')}_w{wbits}" + (f"_seed{seed}" if seed else "")
    return Run(rid, {"config": cfg.as_dict(), "ppl": {"syn": ppl}, "bits": {"bpw": bpw, "code_bpw": bpw}})
