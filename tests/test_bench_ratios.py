"""benchmarks/ratios.py: the speed-up table is read off the right statistic of each implementation."""

import importlib.util
from pathlib import Path


def _ratios():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "ratios.py"
    spec = importlib.util.spec_from_file_location("ratios", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _bench(impl: str, median: float, minimum: float) -> dict:
    return {"group": "op fwd B=8", "name": f"test_op[8-fwd-{impl}]", "stats": {"median": median, "min": minimum}}


def test_table_ratios_use_the_chosen_statistic():
    data = {"benchmarks": [_bench("eager", 0.030, 0.020), _bench("compile", 0.020, 0.010), _bench("cpp", 0.010, 0.010)]}
    ratios = _ratios()
    median_row = ratios.table([data], "median").splitlines()[2]
    min_row = ratios.table([data], "min").splitlines()[2]
    assert median_row == "| op fwd B=8 | 30.00 ms | 20.00 ms | 10.00 ms | 3.00x | 2.00x |"
    assert min_row == "| op fwd B=8 | 20.00 ms | 10.00 ms | 10.00 ms | 2.00x | 1.00x |"


def test_several_runs_combine_per_cell():
    runs = [{"benchmarks": [_bench("eager", 0.030, 0.020), _bench("cpp", 0.010, 0.008)]},
            {"benchmarks": [_bench("eager", 0.040, 0.016), _bench("cpp", 0.020, 0.012)]},
            {"benchmarks": [_bench("eager", 0.050, 0.030), _bench("cpp", 0.030, 0.009)]}]
    ratios = _ratios()
    # min: the best round of any run (16 ms, 8 ms); median: the median of the runs' medians (40 ms, 20 ms).
    assert ratios.table(runs, "min").splitlines()[2] == "| op fwd B=8 | 16.00 ms | - | 8.00 ms | 2.00x | - |"
    assert ratios.table(runs, "median").splitlines()[2] == "| op fwd B=8 | 40.00 ms | - | 20.00 ms | 2.00x | - |"


def test_blas_products_add_the_op_over_product_column():
    data = {"benchmarks": [_bench("eager", 0.030, 0.030), _bench("cpp", 0.022, 0.022), _bench("blas", 0.020, 0.020)]}
    lines = _ratios().table([data], "median").splitlines()
    assert lines[0].endswith("| cpp | cpp vs eager | cpp vs compile | blas | cpp / blas |")
    assert lines[2] == "| op fwd B=8 | 30.00 ms | - | 22.00 ms | 1.36x | - | 20.00 ms | 1.10x |"
