"""python -m pipeline.predict: every input kind -> forecasts, PNG and GIF; bad input -> one line, exit 2."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from PIL import Image

from pipeline.cli import run_stage
from pipeline.predict import main
from tests.test_evaluate import IN, OUT, SIZE, moving_storms, write_checkpoint, write_windows


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    ckpt = write_checkpoint(root / "best.pt")
    storms = moving_storms(2, IN + 2, seed=4)  # (E, T, H, W)
    write_windows(root / "test.h5", moving_storms(3, IN + OUT, seed=2))
    np.save(root / "frames.npy", storms[0])
    np.savez(root / "frames.npz", frames=storms[0].astype(np.float32) / 255.0, other=storms[1])
    sevir_path = root / "vil" / "2019" / "SEVIR_VIL_TEST.h5"
    sevir_path.parent.mkdir(parents=True)
    with h5py.File(sevir_path, "w") as h5:
        h5.create_dataset("id", data=np.array([b"S1", b"S2"]))
        h5.create_dataset("vil", data=np.ascontiguousarray(np.moveaxis(storms, 1, -1)))  # (N, H, W, T)
    (root / "CATALOG.csv").write_text(
        "id,file_name,file_index,img_type,time_utc,minute_offsets,episode_id,event_id,event_type,llcrnrlat,llcrnrlon,"
        "urcrnrlat,urcrnrlon,proj,size_x,size_y,height_m,width_m,data_min,data_max,pct_missing\n"
        + "".join(
            f"S{i + 1},vil/2019/SEVIR_VIL_TEST.h5,{i},vil,2019-06-0{i + 1} 12:00:00,,1,1,Hail,0,0,1,1,p,{SIZE},{SIZE},"
            f"1,1,0,255,0\n"
            for i in range(2)
        )  # fmt: skip
    )
    return root, ckpt


def _run(*args: str) -> int:
    return run_stage(main, list(args))


def _check_outputs(out, lead_minutes: int = 5) -> dict:
    if out.suffix == ".npz":
        with np.load(out) as z:
            got = {k: z[k] for k in z.files}
    else:
        with h5py.File(out) as h5:
            got = {k: h5[k][()] for k in h5}
    for key in ("forecast", "persistence", "optical_flow"):
        assert got[key].shape == (OUT, SIZE, SIZE) and got[key].dtype == np.uint8
    np.testing.assert_array_equal(got["lead_min"], lead_minutes * np.arange(1, OUT + 1))
    assert got["inputs"].shape == (IN, SIZE, SIZE)
    np.testing.assert_array_equal(got["persistence"][0], got["inputs"][-1])
    with Image.open(out.with_suffix(".png")) as png:
        assert png.format == "PNG" and png.size[0] > 100
    with Image.open(out.with_suffix(".gif")) as gif:
        assert gif.format == "GIF" and gif.n_frames == OUT
    return got


@pytest.mark.parametrize("kind", ["windows", "sevir", "event", "npy", "npz"])
def test_each_input_kind_gives_forecasts_and_images(files, tmp_path, kind):
    root, ckpt = files
    args = {"windows": ["--windows", str(root / "test.h5"), "--window", "1"],
            "sevir": ["--sevir", str(root / "vil" / "2019" / "SEVIR_VIL_TEST.h5"), "--index", "0"],
            "event": ["--event-id", "S1", "--catalog", str(root / "CATALOG.csv")],
            "npy": ["--npy", str(root / "frames.npy")],
            "npz": ["--npz", str(root / "frames.npz")]}[kind]  # fmt: skip
    out = tmp_path / ("f.h5" if kind == "sevir" else "f.npz")
    assert _run(*args, "--checkpoint", str(ckpt), "--out", str(out), "--params", str(tmp_path / "none.yaml")) == 0
    got = _check_outputs(out)
    if kind in ("sevir", "event", "npy", "npz"):  # the same event: the last IN of its frames, same forecast
        np.testing.assert_array_equal(got["inputs"], moving_storms(2, IN + 2, seed=4)[0][-IN:])


def test_windows_file_frame_minutes_give_the_leads(files, tmp_path):
    root, ckpt = files
    path = write_windows(tmp_path / "w.h5", moving_storms(1, IN + OUT, seed=1))
    with h5py.File(path, "a") as h5:
        h5.attrs["frame_minutes"] = 10
    out = tmp_path / "f.npz"
    assert _run("--windows", str(path), "--window", "0", "--checkpoint", str(ckpt), "--out", str(out)) == 0
    _check_outputs(out, lead_minutes=10)


def _bad(tmp_path, name, array, key="frames"):
    path = tmp_path / name
    np.savez(path, **{key: array}) if name.endswith(".npz") else np.save(path, array)
    return path


@pytest.mark.parametrize("case, needle", [
    ("short", "needs 4 input frames"),
    ("size", "frames are 16x16 but the model takes 32x32"),
    ("over255", "range 0..300"),
    ("negative", "range -1..5"),
    ("nan", "NaN"),
    ("float_over_1", "expected 0-1"),
    ("event", "no VIL event with id 'S9'"),
    ("missing", "missing.npy: input file not found"),
    ("key", "no array 'frames'"),
    ("checkpoint", "not a format-1 training checkpoint"),
    ("window", "--window 7 out of range"),
])  # fmt: skip
def test_bad_input_is_one_line_exit_2_and_no_output(files, tmp_path, capsys, case, needle):
    root, ckpt = files
    good = moving_storms(1, IN, seed=3)[0]
    src = {
        "short": lambda: ["--npy", str(_bad(tmp_path, "a.npy", good[:2]))],
        "size": lambda: ["--npy", str(_bad(tmp_path, "a.npy", good[:, :16, :16]))],
        "over255": lambda: ["--npy", str(_bad(tmp_path, "a.npy", np.full((IN, SIZE, SIZE), 300, np.int32)))],
        "negative": lambda: [
            "--npy",
            str(
                _bad(
                    tmp_path,
                    "a.npy",
                    np.pad(np.full((IN, SIZE, SIZE - 1), 5), ((0, 0), (0, 0), (0, 1)), constant_values=-1),
                )
            ),
        ],
        "nan": lambda: ["--npy", str(_bad(tmp_path, "a.npy", np.full((IN, SIZE, SIZE), np.nan, np.float32)))],
        "float_over_1": lambda: ["--npy", str(_bad(tmp_path, "a.npy", np.full((IN, SIZE, SIZE), 2.0, np.float32)))],
        "event": lambda: ["--event-id", "S9", "--catalog", str(root / "CATALOG.csv")],
        "missing": lambda: ["--npy", str(tmp_path / "missing.npy")],
        "key": lambda: ["--npz", str(_bad(tmp_path, "a.npz", good, key="vil"))],
        "checkpoint": lambda: ["--npy", str(root / "frames.npy")],
        "window": lambda: ["--windows", str(root / "test.h5"), "--window", "7"],
    }[case]()
    model = ckpt
    if case == "checkpoint":
        model = tmp_path / "not.pt"
        import torch

        torch.save({"weights": torch.zeros(1)}, model)
    out = tmp_path / "out" / "f.npz"
    assert _run(*src, "--checkpoint", str(model), "--out", str(out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
