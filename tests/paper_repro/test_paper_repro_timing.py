"""paper_repro/timing.py: every configuration is timed on the same batches and the table has its ratios."""
from __future__ import annotations

from paper_repro import timing


def test_round_robin_timing_table(mnist_dir, tmp_path):
    out = tmp_path / "timing.md"
    text = timing.main(["--data-dir", str(mnist_dir), "--warm-steps", "2", "--rounds", "2", "--batch-size", "4",
                        "--test-subset", "16", "--configs", "vanilla:discrete,skip:discrete,skip_reg:continuous",
                        "--output", str(out)])
    assert out.read_text() == text
    rows = [line for line in text.splitlines() if line.startswith("| vanilla |") or line.startswith("| skip")]
    assert len(rows) == 3
    for line in rows:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert all(float(c) > 0 for c in cells[2:6])  # step, forward, backward, prediction times were measured
        assert float(cells[7]) >= 1  # test NFE
    assert "| vanilla discrete / skip discrete |" in text
