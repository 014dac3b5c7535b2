"""benchmarks/row_moves.py on CPU: its four moves run and agree (there both take XLA's
gathers), and its tile sweep restores the kernels' tilings."""

from benchmarks import row_moves
from modjax.kernels import pallas_rows as pr


def test_row_moves_table(capsys):
    rows = row_moves.main(["--shapes", "40,32,4,3", "--iters", "1", "--dtype", "float32"])
    assert [r["move"] for r in rows] == ["to_blocks", "to_blocks grad", "combine", "combine grad"]
    assert all(r["xla_ms"] > 0 and r["kernels_ms"] > 0 for r in rows)
    assert capsys.readouterr().out.count("| 40 | 32 | 4 | 3 |") == 4


def test_row_moves_sweep_restores_the_tiles(monkeypatch, capsys):
    before = (dict(pr.SCATTER_TILES), dict(pr.GATHER_TILES))
    two = row_moves._tilings((8, 32, 4), (16, 32, 4, 2))
    monkeypatch.setattr(row_moves, "SWEEP", {"SCATTER_TILES": two, "GATHER_TILES": two})
    row_moves.main(["--shapes", "40,32,4,3", "--iters", "1", "--dtype", "float32", "--sweep"])
    assert (pr.SCATTER_TILES, pr.GATHER_TILES) == before
    assert capsys.readouterr().out.count("'bd': 32") == 8  # two tilings of each move


def test_row_moves_sweep_of_chosen_moves(monkeypatch, capsys):
    one = row_moves._tilings((8, 32, 4))
    monkeypatch.setattr(row_moves, "SWEEP", {"SCATTER_TILES": one, "GATHER_TILES": one})
    row_moves.main(["--shapes", "40,32,4,3", "--iters", "1", "--dtype", "float32", "--sweep",
                    "--moves", "to_blocks,combine grad"])  # fmt: skip
    out = capsys.readouterr().out
    assert "| to_blocks |" in out and "| combine grad |" in out and "| combine |" not in out
