"""``zfk visualize`` under hostile conditions: links in ``--data`` and in ``--out``, resuming
against other data, workers that die, hand-edited checkpoints, names in ``--out`` that are
folders, absurd ``--features`` and ``--top``, and two runs on one output folder."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Callable, Dict, List

import pytest
import torch

from zfkernels.cli.common import LOCK_FILE, parse_index_list
from zfkernels.job import data as data_mod
from zfkernels.job.checkpoint import CheckpointError, ScanState
from zfkernels.job.io import atomic_write_text
from zfkernels.job.topk import EMPTY

from _visualize import REPO, photo_folder, read_topk, subprocess_env, visualize, write_photo, zfk, zfk_command

SMALL = ["--layers", "conv1", "--features", "0-2", "--top", "3", "--batch-size", "2"]


def one_line_error(status: int, err: str, starts: str, contains: str = "") -> str:
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"zfk visualize: error: {starts}") and contains in lines[0], lines[0]
    return lines[0]


# -- links in --data ------------------------------------------------------------------------------


def test_no_folder_link_is_followed_and_no_file_is_listed_twice(tmp_path):
    root = photo_folder(tmp_path / "data", 3)
    write_photo(root / "class" / "d.png", 7)
    write_photo(tmp_path / "elsewhere" / "e.png", 8)
    os.symlink("..", root / "class" / "up")  # back up the tree: every image a second time
    os.symlink("/proc/self", root / "proc")  # the whole filesystem through /proc/self/root
    os.symlink(tmp_path / "elsewhere", root / "outside")  # a folder outside --data
    os.symlink("loop_b", root / "loop_a")  # a link loop
    os.symlink("loop_a", root / "loop_b")
    os.symlink(tmp_path / "elsewhere" / "e.png", root / "far.png")  # a file outside --data
    os.symlink("img000.png", root / "same.png")  # a second name for a file
    os.link(root / "img001.png", root / "z_hard.png")  # and a hard link (the first name in order is kept)
    found = data_mod.discover(root)
    assert found.files == ["class/d.png", "img000.png", "img001.png", "img002.png"]
    assert dict(found.ignored) == {
        "class/up": "a link to a folder (not followed)",
        "proc": "a link to a folder (not followed)",
        "outside": "a link to a folder (not followed)",
        "loop_a": "not an image file (extension)",
        "loop_b": "not an image file (extension)",
        "far.png": "a link to a file outside the data folder (not followed)",
        "same.png": "the same file as img000.png",
        "z_hard.png": "the same file as img001.png",
    }


def test_a_link_back_up_the_data_folder_scans_each_image_once(tmp_path, capsys):
    data, out = photo_folder(tmp_path / "data", 4), tmp_path / "out"
    os.symlink("..", data / "up")
    status, stdout, err = zfk(visualize(data, out, "--layers", "conv1", "--features", "0-1", "--top", "4"), capsys)
    assert status == 0, err
    assert "4 images scanned" in stdout
    for m in read_topk(out)["layers"]["conv1"]:
        assert sorted(e["image"] for e in m["top"]) == ["img000.png", "img001.png", "img002.png", "img003.png"]


def test_the_data_folder_itself_may_be_a_link(tmp_path):
    real = photo_folder(tmp_path / "real", 2)
    os.symlink(real, tmp_path / "data")
    assert data_mod.discover(tmp_path / "data").files == ["img000.png", "img001.png"]


# -- resuming against other data ------------------------------------------------------------------


def test_resume_against_another_folder_with_the_same_names_is_refused(tmp_path, capsys):
    first, second, out = photo_folder(tmp_path / "a", 4), photo_folder(tmp_path / "b", 4, seed=50), tmp_path / "out"
    assert zfk(visualize(first, out, *SMALL), capsys)[0] == 0
    status, _, err = zfk(visualize(second, out, *SMALL, "--resume"), capsys)
    one_line_error(status, err, "--resume: ", "(image_files differ)")


def test_resume_after_a_file_was_rewritten_is_refused(tmp_path, capsys):
    data, out = photo_folder(tmp_path / "data", 4), tmp_path / "out"
    assert zfk(visualize(data, out, *SMALL), capsys)[0] == 0
    write_photo(data / "img002.png", 99)  # same name, other picture
    status, _, err = zfk(visualize(data, out, *SMALL, "--resume"), capsys)
    one_line_error(status, err, "--resume: ", "(image_files differ)")
    # The identity moves with the file's size and time, not with the clock of the check.
    assert data_mod.discover(data).identity() == data_mod.discover(data).identity()


# -- workers that die, errors beside workers --------------------------------------------------------


def children(pid: int) -> List[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def start(args: List[object], *, code: str = "") -> subprocess.Popen:
    """``zfk ARGS`` in a subprocess of its own process group (``code`` runs first, in the same
    interpreter)."""
    command = zfk_command(*args)
    if code:
        script = code + "\nimport sys\nfrom zfkernels.cli import main\nsys.exit(main(sys.argv[1:]))\n"
        command = [sys.executable, "-c", script, *command[3:]]
    return subprocess.Popen(command, env=subprocess_env(threads=1), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=REPO, start_new_session=True)


def finish(process: subprocess.Popen, timeout: float = 90) -> str:
    """The process's stderr once it has exited; a failure (and a kill) if it does not."""
    try:
        _, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        for child in children(process.pid) if Path(f"/proc/{process.pid}").exists() else []:
            os.kill(child, signal.SIGKILL)
        _, err = process.communicate()
        pytest.fail(f"the run did not exit within {timeout} s: {err[-2000:]}")
    return err


def slow_run(data: Path, out: Path, workers: int) -> List[object]:
    """A pass 1 of 40 one-image batches, checkpointing after each (the first one tells it started)."""
    return ["visualize", "--data", data, "--out", out, "--device", "cpu", "--workers", workers, "--quiet", "--layers",
            "conv1", "--features", "0-1", "--top", "2", "--batch-size", "1", "--checkpoint-every", "0"]


def wait_for(what: Callable[[], bool], process: subprocess.Popen, message: str) -> None:
    deadline = time.monotonic() + 120
    while not what():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"{message}: {process.communicate()[1][-2000:]}")
        time.sleep(0.01)


@pytest.fixture(scope="module")
def forty(tmp_path_factory) -> Path:
    return photo_folder(tmp_path_factory.mktemp("forty") / "data", 40)


KILL_A_WORKER = textwrap.dedent("""
    import os, signal
    from zfkernels.job import data
    getitem = data.BatchDataset.__getitem__
    def getitem_or_die(self, k):
        # In a worker, as the kernel's out-of-memory killer would. Past the loader's first
        # prefetch (2 workers x 4 batches), so pass 1 has consumed and checkpointed batches by then.
        if k == 20:
            os.kill(os.getpid(), signal.SIGKILL)
        return getitem(self, k)
    data.BatchDataset.__getitem__ = getitem_or_die
""")


@pytest.mark.slow
def test_a_killed_worker_ends_the_run_with_one_line(forty, tmp_path):
    out = tmp_path / "out"
    process = start(slow_run(forty, out, workers=2), code=KILL_A_WORKER)
    err = finish(process)
    assert process.returncode == 1 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    # PyTorch names the dead worker, or (killed while it handed a batch over) the connection broke.
    assert last.startswith("zfk visualize: error: pass 1 stopped: a decoding worker died (DataLoader worker (pid") or \
        last.startswith("zfk visualize: error: pass 1 stopped: a decoding worker died (its connection broke"), last
    assert "--resume" in last
    assert not ScanState.load(out / "checkpoint.pt").complete  # the last periodic checkpoint stands


@pytest.mark.parametrize("error", [ConnectionResetError(104, "Connection reset by peer"), EOFError(),
                                   RuntimeError("DataLoader worker (pid 12345) is killed by signal: Killed. ")])
def test_a_broken_worker_connection_is_a_dead_worker(error):
    """The forms a worker's death takes in the main process, each one line naming it."""
    with pytest.raises(data_mod.WorkersFailed, match=r"^a decoding worker died \((DataLoader worker \(pid 12345\) is "
                       r"killed by signal: Killed|its connection broke while it sent a batch: \w+)\); see the system log"):
        with data_mod.worker_guard():
            raise error


def test_other_errors_pass_through_the_worker_guard():
    with pytest.raises(RuntimeError, match="a bug"):
        with data_mod.worker_guard():
            raise RuntimeError("a bug")


@pytest.mark.slow
def test_sigterm_to_the_whole_process_group_checkpoints_and_exits(forty, tmp_path):
    """As `timeout` or a batch scheduler sends it: the workers outlive it, the main process
    writes its checkpoint, ends them and exits with the one-line message."""
    out = tmp_path / "out"
    process = start(slow_run(forty, out, workers=2))
    wait_for(lambda: (out / "checkpoint.pt").exists(), process, "pass 1 did not start")
    os.killpg(process.pid, signal.SIGTERM)
    err = finish(process)
    assert process.returncode == 128 + signal.SIGTERM, err
    assert err.strip().splitlines()[-1].startswith("zfk visualize: interrupted by SIGTERM; pass 1 checkpoint written")
    state = ScanState.load(out / "checkpoint.pt")
    assert not state.complete and state.scanned == len(state.done) > 0


@pytest.mark.slow
def test_an_error_beside_workers_ends_the_run(forty, tmp_path):
    """A bug in the main process while workers decode: its traceback, then the process exits
    (it used to wait for the workers forever)."""
    out = tmp_path / "out"
    code = textwrap.dedent("""
        from zfkernels.job import scan
        update = scan.Scanner.update
        calls = []
        def failing(self, *args, **kwargs):
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("a bug in pass 1")
            return update(self, *args, **kwargs)
        scan.Scanner.update = failing
    """)
    process = start(slow_run(forty, out, workers=2), code=code)
    err = finish(process)
    assert process.returncode == 1 and err.strip().splitlines()[-1] == "RuntimeError: a bug in pass 1", err


@pytest.mark.slow
def test_a_hand_edited_checkpoint_with_workers_is_refused(forty, tmp_path):
    out = tmp_path / "out"
    process = start(slow_run(forty, out, workers=2))
    wait_for(lambda: (out / "checkpoint.pt").exists(), process, "pass 1 did not start")
    process.kill()
    process.communicate()
    state = ScanState.load(out / "checkpoint.pt")
    state.topk["conv1"]["images"][0, 0] = 10**9  # pass 2 would index the file list with it
    state.save(out / "checkpoint.pt")
    process = start(slow_run(forty, out, workers=2) + ["--resume"])
    err = finish(process)
    assert process.returncode == 2 and "Traceback" not in err, err
    assert err.strip().startswith("zfk visualize: error: --resume: ") and "1000000000" in err


# -- hand-edited checkpoints ------------------------------------------------------------------------


def edit_topk(key: str, change: Callable[[torch.Tensor], object]) -> Callable[[ScanState], None]:
    def edit(state: ScanState) -> None:
        state.topk["conv1"][key] = change(state.topk["conv1"][key])
    return edit


def set_entry(key: str, value) -> Callable[[ScanState], None]:
    def change(tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.clone()
        tensor[0, 0] = value
        return tensor
    return edit_topk(key, change)


EDITS: Dict[str, tuple] = {
    "image index 10^9": (set_entry("images", 10**9), "names image 1000000000"),
    "negative image index": (set_entry("images", -1), "names image -1"),
    "image of a slot not done": (set_entry("images", 5), "names image 5"),
    "NaN ahead of numbers": (set_entry("values", math.nan), "not in rank order"),
    "position outside the map": (set_entry("positions", 10**6), "positions outside"),
    "entries out of order": (set_entry("values", -1e30), "not in rank order"),
    "one image twice in a map": (edit_topk("images", lambda t: t[:, [0, 0, 2]]), "names an image twice in one map"),
    "complete on a partial scan": (lambda s: setattr(s, "complete", True), "complete=True with 2 of 3 slots"),
    "a slot that does not exist": (lambda s: setattr(s, "done", [0, 7]), "done slots"),
    "a scanned count that does not add up": (lambda s: setattr(s, "scanned", 9), "9 images scanned"),
    "a missing layer": (lambda s: s.topk.clear(), "holds the layers none, not conv1"),
    "another layer": (lambda s: s.topk.update(conv2=s.topk.pop("conv1")), "layers conv2, not conv1"),
    "wrong shape": (edit_topk("values", lambda t: t[:, :2]), "must be (feature maps, K)"),
    "wrong dtype": (edit_topk("images", lambda t: t.to(torch.int32)), "images must be a torch.int64 tensor"),
    "not a tensor": (edit_topk("positions", lambda t: t.tolist()), "positions must be a torch.int64 tensor"),
    "another map size": (edit_topk("map_size", lambda size: [size[0] + 1, size[1]]), "maps are"),
    "other feature maps": (edit_topk("channels", lambda t: t + 1), "feature maps are not those asked for"),
    "a skipped file twice": (lambda s: setattr(s, "skipped", [(0, "x"), (0, "x")]), "skipped files"),
}


@pytest.fixture(scope="module")
def partial_checkpoint(tmp_path_factory):
    """A real checkpoint of 2 of the 3 slots of a 6-image run (conv1, maps 0-2, top 3), and
    what the check needs to know of that run."""
    from zfkernels import models
    from zfkernels.job.scan import ScanPlan, map_sizes, run_scan

    work = tmp_path_factory.mktemp("checkpoint")
    root = photo_folder(work / "data", 6)
    images = data_mod.discover(root).first(4)  # the scan covers slots 0 and 1 ...
    channels = {"conv1": torch.arange(3)}
    plan = ScanPlan(images, data_mod.Slots(4, 2), ["conv1"], channels, 3, {"test": 1})
    model = models.zfnet(seed=0).eval()
    run_scan(model, plan, torch.device("cpu"), checkpoint=work / "checkpoint.pt")
    state = ScanState.load(work / "checkpoint.pt")
    state.complete = False  # ... of a 6-image plan, in which they are 2 of 3
    context = {"count": 6, "slot_size": 2, "top": 3, "channels": channels, "map_sizes": map_sizes(model, ["conv1"])}
    return work / "checkpoint.pt", context


def test_the_unedited_checkpoint_passes_the_check(partial_checkpoint):
    path, context = partial_checkpoint
    state = ScanState.load(path)
    state.complete = False
    state.check(**context)


@pytest.mark.parametrize("case", list(EDITS))
def test_a_hand_edited_checkpoint_is_refused_saying_what_is_wrong(partial_checkpoint, tmp_path, case):
    path, context = partial_checkpoint
    edit, message = EDITS[case]
    state = ScanState.load(path)
    state.complete = False
    edit(state)
    edited = tmp_path / "checkpoint.pt"
    state.save(edited)
    with pytest.raises(CheckpointError) as refused:
        ScanState.load(edited).check(**context)
    assert message in str(refused.value) and "without --resume" in str(refused.value)
    assert "\n" not in str(refused.value)


def test_a_hand_edited_checkpoint_is_refused_by_the_command(tmp_path, capsys):
    data, out = photo_folder(tmp_path / "data", 4), tmp_path / "out"
    assert zfk(visualize(data, out, *SMALL), capsys)[0] == 0
    state = ScanState.load(out / "checkpoint.pt")
    state.topk["conv1"]["values"][1, 0] = math.nan
    state.save(out / "checkpoint.pt")
    status, _, err = zfk(visualize(data, out, *SMALL, "--resume"), capsys)
    one_line_error(status, err, f"--resume: checkpoint {out / 'checkpoint.pt'} is inconsistent (", "rank order")


# -- links and folders in --out ---------------------------------------------------------------------


@pytest.mark.parametrize("planted", [".zfk", "index.html", "layers", "layers/conv1", "checkpoint.pt"])
def test_a_link_planted_in_the_output_folder_is_refused_and_not_written_through(tmp_path, capsys, planted):
    data, out = photo_folder(tmp_path / "data", 3), tmp_path / "out"
    assert zfk(visualize(data, out, *SMALL), capsys)[0] == 0
    target = tmp_path / "victim"
    if planted.startswith("layers"):
        target.mkdir()
        (out / planted).rename(tmp_path / "moved")
    else:
        target.write_text("precious\n")
        (out / planted).unlink()
    os.symlink(target, out / planted)
    before = sorted((p.name, p.read_bytes() if p.is_file() else None) for p in [target, *target.glob("**/*")])
    for extra in ([], ["--resume"]):
        status, _, err = zfk(visualize(data, out, *SMALL, *extra), capsys)
        one_line_error(status, err, f"--out {out}: {out / planted} is a symbolic link")
    assert sorted((p.name, p.read_bytes() if p.is_file() else None) for p in [target, *target.glob("**/*")]) == before


def test_an_atomic_write_never_goes_through_a_link_in_an_output_folder(tmp_path):
    out = tmp_path / "out"
    (out / "layers").mkdir(parents=True)
    (out / ".zfk").write_text("a zfk output folder\n")
    outside = tmp_path / "outside"
    (outside / "conv1").mkdir(parents=True)
    os.symlink(outside, out / "linked")
    with pytest.raises(OSError, match="is a symbolic link inside the output folder"):
        atomic_write_text(out / "linked" / "conv1" / "f0000.png", "x")
    assert list(outside.glob("**/*")) == [outside / "conv1"]
    # A link at the file itself is replaced by the file, not followed.
    (outside / "index.html").write_text("precious\n")
    os.symlink(outside / "index.html", out / "index.html")
    atomic_write_text(out / "index.html", "new\n")
    assert not (out / "index.html").is_symlink() and (out / "index.html").read_text() == "new\n"
    assert (outside / "index.html").read_text() == "precious\n"
    # Outside a zfk output folder, links are the user's business.
    os.symlink(outside, tmp_path / "alias")
    atomic_write_text(tmp_path / "alias" / "conv1" / "ok.txt", "fine")
    assert (outside / "conv1" / "ok.txt").read_text() == "fine"


@pytest.mark.parametrize("name", ["index.html", "topk.json", "checkpoint.pt", "layer-conv1.html", "layers/conv1.png"])
def test_a_folder_where_a_file_is_written_is_refused_before_anything_is_written(tmp_path, capsys, name):
    data, out = photo_folder(tmp_path / "data", 3), tmp_path / "out"
    assert zfk(visualize(data, out, *SMALL), capsys)[0] == 0
    (out / name).unlink()
    (out / name).mkdir()
    before = sorted(str(p.relative_to(out)) for p in out.glob("**/*"))
    for extra in ([], ["--resume"]):
        status, _, err = zfk(visualize(data, out, *SMALL, *extra), capsys)
        one_line_error(status, err, f"--out {out}: {out / name} is not a file")
    assert sorted(str(p.relative_to(out)) for p in out.glob("**/*")) == before


# -- absurd arguments -------------------------------------------------------------------------------


def test_a_huge_features_range_is_refused_without_being_built(tmp_path, small_data, capsys):
    out = tmp_path / "out"
    status, _, err = zfk(visualize(small_data, out, "--features", "0-1000000000"), capsys)
    one_line_error(status, err, "--features: 1000000000 is out of range for conv1, which has 96 feature maps")
    assert not out.exists()
    with pytest.raises(Exception, match="out of range"):
        parse_index_list("5,0-" + "9" * 30, "--features", limit=96)
    status, _, err = zfk(visualize(small_data, out, "--features", "1-" + "9" * 5000), capsys)
    assert len(one_line_error(status, err, "--features: ", "is not a non-negative number")) < 200


@pytest.mark.parametrize("top, ok", [(1_000_000_000, False), (10, False), (9, True)])
def test_top_is_bounded_by_the_number_of_images(tmp_path, small_data, capsys, top, ok):
    out = tmp_path / "out"
    status, _, err = zfk(visualize(small_data, out, "--layers", "conv1", "--features", "0", "--top", str(top)), capsys)
    if ok:  # fewer images than the default 9: the paper's 3x3 grid stays allowed
        assert status == 0, err
        return
    one_line_error(status, err, f"--top {top}: more than the 2 images of the run")
    assert not out.exists()


@pytest.fixture
def small_data(tmp_path) -> Path:
    return photo_folder(tmp_path / "data", 2)


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_checkpoint_every_must_be_a_finite_number_of_seconds(tmp_path, small_data, capsys, value):
    out = tmp_path / "out"
    status, _, err = zfk(visualize(small_data, out, "--checkpoint-every", value), capsys)
    one_line_error(status, err, "--checkpoint-every: ")
    assert not out.exists()


# -- two runs on one --out --------------------------------------------------------------------------


def test_a_second_run_on_a_locked_output_folder_is_refused_naming_the_first(tmp_path, small_data, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".zfk").write_text("a zfk output folder\n")
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        sys.argv = ["zfk", "visualize", "--out", {str(out)!r}]
        from zfkernels.cli.common import lock_out
        lock_out(Path({str(out)!r}))
        print("locked", flush=True)
        time.sleep(600)
    """)], env=subprocess_env(threads=1), stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "locked"
        status, _, err = zfk(visualize(small_data, out, *SMALL), capsys)
        one_line_error(status, err, f"--out {out}: another zfk run is writing into this folder "
                                    f"(pid {holder.pid}: zfk visualize --out {out})")
        assert sorted(p.name for p in out.iterdir()) == [".zfk", LOCK_FILE]  # nothing written
    finally:
        holder.kill()
        holder.wait()
    # The lock ends with its process, however it ends.
    status, _, err = zfk(visualize(small_data, out, *SMALL), capsys)
    assert status == 0, err
    assert (out / LOCK_FILE).read_text().startswith(f"pid {os.getpid()}: zfk ")


def test_one_process_may_run_twice_on_its_own_output_folder(tmp_path, small_data, capsys):
    out = tmp_path / "out"
    assert zfk(visualize(small_data, out, *SMALL), capsys)[0] == 0
    assert zfk(visualize(small_data, out, *SMALL), capsys)[0] == 0
