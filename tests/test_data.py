"""Tests of the data part of dsvae_lib: PROTOCOL.md at pixel level, the split, the sheets, the cache, the scaling.

All tests use the real LPC sheets; caches live in temp folders (see conftest.py).
"""
import functools
import shutil
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import dsvae_lib
from dsvae_lib import SheetError


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch):
    """No test here may pick up a user's sheets/cache settings or route local HTTP through a proxy."""
    for var in ("DSVAE_SHEETS", "DSVAE_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "*")
    monkeypatch.setenv("NO_PROXY", "*")


# ----------------------------------------------------------------------------- PROTOCOL.md, written out again
# Deliberately NOT imported from dsvae_lib: the test re-states the protocol so that it checks it independently.
LAYERS = ("body", "bottomwear", "topwear", "hair")  # skin, pants, top, hair -- then shoes/1.png last
SHEET_W, SHEET_H, CELL = 832, 1344, 64
ROW = {("walk", "front"): 10, ("walk", "left"): 9, ("walk", "right"): 11,
       ("spellcard", "front"): 2, ("spellcard", "left"): 1, ("spellcard", "right"): 3,
       ("slash", "front"): 14, ("slash", "left"): 13, ("slash", "right"): 15}
COLUMNS = {"walk": (8, 1, 2, 3, 4, 5, 6, 7),
           "spellcard": (0, 1, 2, 3, 4, 5, 4, 6),
           "slash": (0, 1, 2, 3, 4, 5, 4, 0)}
ACTION = {"walk": 0, "spellcard": 1, "slash": 2}
DIRECTION = {"front": 0, "left": 1, "right": 2}

# Six sequences: every action and direction twice, each attribute takes all six values, three per split.
CASES = [  # (skin, pants, top, hair), action, direction, split        character id
    ((0, 1, 4, 3), "walk", "front", "test"),        # 63
    ((1, 2, 5, 4), "walk", "right", "train"),       # 322
    ((2, 3, 0, 5), "spellcard", "left", "test"),    # 545
    ((3, 4, 1, 0), "spellcard", "right", "train"),  # 798
    ((4, 5, 2, 1), "slash", "front", "train"),      # 1057
    ((5, 0, 3, 2), "slash", "left", "test"),        # 1100
]


def compose_sheet(sheets, attrs):
    """Independent composition: full sheets alpha-composited onto opaque black, RGB kept (H, W, 3) uint8."""
    canvas = Image.new("RGBA", (SHEET_W, SHEET_H), (0, 0, 0, 255))
    paths = [sheets / folder / f"{v}.png" for folder, v in zip(LAYERS, attrs)] + [sheets / "shoes" / "1.png"]
    for path in paths:
        layer = Image.open(path).convert("RGBA")
        assert layer.size == (SHEET_W, SHEET_H), path
        canvas = Image.alpha_composite(canvas, layer)
    return np.asarray(canvas)[..., :3]


def cell(sheet, row, col):
    return sheet[row * CELL:(row + 1) * CELL, col * CELL:(col + 1) * CELL]


# ----------------------------------------------------------------------------- 1. pixels
@pytest.mark.parametrize("attrs, action, direction, split", CASES,
                         ids=[f"{a}-{d}-{s}" for _, a, d, s in CASES])
def test_frames_match_independent_composition(attrs, action, direction, split, sheets_dir, train, test_split):
    """The loader's 8 frames equal a by-hand Pillow composition of the full sheets cropped per PROTOCOL.md."""
    data, other = (train, test_split) if split == "train" else (test_split, train)
    skin, pants, top, hair = attrs
    c = 216 * skin + 36 * pants + 6 * top + hair
    i = data.index(skin, pants, top, hair, ACTION[action], DIRECTION[direction])
    assert (data.character[i], data.action[i], data.direction[i]) == (c, ACTION[action], DIRECTION[direction])
    assert tuple(data.attributes[i]) == attrs
    with pytest.raises(KeyError):
        other.index(skin, pants, top, hair, ACTION[action], DIRECTION[direction])

    sheet = compose_sheet(sheets_dir, attrs)
    expected = np.stack([cell(sheet, ROW[action, direction], col) for col in COLUMNS[action]])
    assert expected.shape == (8, 64, 64, 3) and expected.any()  # a visible character, not an empty cell
    got = np.asarray(data.frames[i])
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, expected)


# ----------------------------------------------------------------------------- 2. split and labels
def test_split_sizes_and_characters(train, test_split):
    """9000 train sequences of 1000 characters, 2664 test of 296; disjoint; together 0..1295; seed 423."""
    assert len(train) == 9000 and len(test_split) == 2664
    tr, te = set(train.character.tolist()), set(test_split.character.tolist())
    assert len(tr) == 1000 and len(te) == 296
    assert not tr & te
    assert tr | te == set(range(1296))
    assert tr == set(np.random.RandomState(423).permutation(1296)[:1000].tolist())


@pytest.mark.parametrize("name", ["train", "test"])
def test_every_character_has_all_nine_motions_once(name, train, test_split):
    """Each character appears with each (action, direction) exactly once; labels in range; motion = 3a + d."""
    data = train if name == "train" else test_split
    assert set(data.action.tolist()) == {0, 1, 2} and set(data.direction.tolist()) == {0, 1, 2}
    np.testing.assert_array_equal(data.motion, 3 * data.action + data.direction)
    keys = data.character * 9 + 3 * data.action + data.direction
    assert len(np.unique(keys)) == len(data)  # no (character, motion) twice
    assert len(data) == 9 * len(np.unique(data.character))  # hence all 9 motions for every character


@pytest.mark.parametrize("name", ["train", "test"])
def test_attributes_decode_from_character(name, train, test_split):
    """attributes = (c//216, (c//36)%6, (c//6)%6, c%6), each in 0..5 and all six values used."""
    data = train if name == "train" else test_split
    c = np.asarray(data.character)
    expected = np.stack([c // 216, (c // 36) % 6, (c // 6) % 6, c % 6], axis=1)
    np.testing.assert_array_equal(data.attributes, expected)
    assert data.attributes.shape == (len(data), 4)
    for k in range(4):
        assert set(data.attributes[:, k].tolist()) == set(range(6))


def test_frames_dtype_and_shape(train, test_split):
    """Frames are uint8 (N, 8, 64, 64, 3) with one label per sequence."""
    for data, n in ((train, 9000), (test_split, 2664)):
        assert data.frames.dtype == np.uint8
        assert data.frames.shape == (n, 8, 64, 64, 3)
        for labels in (data.character, data.action, data.direction, data.motion):
            assert labels.shape == (n,)


def test_left_is_the_mirror_image_of_right(test_split):
    """The premise of f_mirror: for every test character and action, the left-facing sequence is the right-facing
    one mirrored to a mean absolute difference under 4/255 per sequence (under 1.5/255 over all of them), while
    unmirrored the two differ by more than 7/255 on average."""
    data, left, right = test_split, dsvae_lib.DIRECTIONS.index("left"), dsvae_lib.DIRECTIONS.index("right")
    mirrored = []
    for action in range(len(dsvae_lib.ACTIONS)):
        for c in np.unique(data.character):
            (i,), (j,) = (np.flatnonzero((data.character == c) & (data.action == action) & (data.direction == d))
                          for d in (left, right))
            a, b = data.frames[i].astype(np.int16), data.frames[j].astype(np.int16)
            mirrored.append(np.abs(a - b[:, :, ::-1]).mean())
            assert mirrored[-1] < 4 and np.abs(a - b).mean() > 7, (dsvae_lib.ACTIONS[action], c)
    assert len(mirrored) == 3 * 296 and np.mean(mirrored) < 1.5


# ----------------------------------------------------------------------------- 3. download, over real HTTP
@pytest.fixture
def sheet_server(tmp_path, copy_sheets):
    """A local HTTP server (127.0.0.1, free port) serving a copy of the protocol's sheets; logs request paths."""
    root = copy_sheets(tmp_path / "served")
    requests = []

    class Handler(SimpleHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def do_GET(self):
            requests.append(self.path)
            super().do_GET()

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield SimpleNamespace(root=root, requests=requests,
                              url=f"http://127.0.0.1:{server.server_address[1]}/{{path}}")
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def files_under(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def test_download_fetches_every_sheet_verified(tmp_path, sheet_server):
    """download_sheets fetches all pinned sheets over HTTP, each matching its checksum, and nothing else;
    a second call with a complete folder fetches nothing."""
    dest = tmp_path / "dl"
    assert dsvae_lib.download_sheets(dest=dest, url=sheet_server.url) == dest
    assert files_under(dest) == sorted(dsvae_lib.SHEET_SHA256)  # every sheet, no *.part leftovers
    for rel, expected in dsvae_lib.SHEET_SHA256.items():
        assert dsvae_lib.sha256(dest / rel) == expected, rel
    assert sorted(sheet_server.requests) == sorted(f"/{rel}" for rel in dsvae_lib.SHEET_SHA256)

    sheet_server.requests.clear()
    dsvae_lib.download_sheets(dest=dest, url=sheet_server.url)
    assert sheet_server.requests == []


def test_download_rejects_corrupted_sheet_and_caches_nothing_bad(tmp_path, sheet_server):
    """A served file with changed bytes raises SheetError naming it and its expected checksum; the corrupt
    file is not left in dest (nor any *.part); after the server is fixed, a retry completes the folder."""
    bad = "topwear/3.png"
    served = sheet_server.root / bad
    original = served.read_bytes()
    payload = bytearray(original)
    payload[len(payload) // 2] ^= 0xFF
    served.write_bytes(bytes(payload))

    dest = tmp_path / "dl"
    with pytest.raises(SheetError) as err:
        dsvae_lib.download_sheets(dest=dest, url=sheet_server.url)
    msg = str(err.value)
    assert bad in msg and dsvae_lib.SHEET_SHA256[bad] in msg
    assert not (dest / bad).exists()
    assert not [p for p in dest.rglob("*") if p.name.endswith(".part")]
    for rel in files_under(dest):  # whatever did arrive is verified
        assert dsvae_lib.sha256(dest / rel) == dsvae_lib.SHEET_SHA256[rel], rel

    served.write_bytes(original)
    dsvae_lib.download_sheets(dest=dest, url=sheet_server.url)
    assert files_under(dest) == sorted(dsvae_lib.SHEET_SHA256)
    assert dsvae_lib.sha256(dest / bad) == dsvae_lib.SHEET_SHA256[bad]


# ----------------------------------------------------------------------------- 4. local sheets folder
def test_missing_sheet_is_named(tmp_path, copy_sheets):
    """A sheets folder lacking one file makes load_sprites raise SheetError naming it; nothing is built."""
    sheets = copy_sheets(tmp_path / "sheets", skip={"hair/4.png"})
    assert dsvae_lib.find_sheets(sheets) == sheets
    cache = tmp_path / "cache"
    with pytest.raises(SheetError, match="missing") as err:
        dsvae_lib.load_sprites("train", sheets=sheets, cache=cache)
    assert "hair/4.png" in str(err.value)
    assert not cache.exists() or not any(cache.iterdir())


def test_nonexistent_sheets_folder_is_reported(tmp_path):
    """find_sheets on a folder that does not exist raises SheetError naming it (no silent download)."""
    with pytest.raises(SheetError) as err:
        dsvae_lib.find_sheets(tmp_path / "nope")
    assert "nope" in str(err.value)


def test_corrupted_local_sheet_is_rejected(tmp_path, copy_sheets):
    """With verify=True a sheet with changed bytes raises SheetError saying 'corrupted' with the expected sha256."""
    sheets = copy_sheets(tmp_path / "sheets")
    rel = "bottomwear/2.png"
    payload = bytearray((sheets / rel).read_bytes())
    payload[100] ^= 0x01
    (sheets / rel).write_bytes(bytes(payload))
    cache = tmp_path / "cache"
    with pytest.raises(SheetError) as err:
        dsvae_lib.load_sprites("test", sheets=sheets, cache=cache, verify=True)
    msg = str(err.value)
    assert "corrupted" in msg and rel in msg and dsvae_lib.SHEET_SHA256[rel] in msg
    assert not cache.exists() or not any(cache.iterdir())


# ----------------------------------------------------------------------------- 5. cache
def snapshot(folder):
    """(name, size, mtime_ns) of every file in a cache folder, plus the folder's own mtime."""
    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir())
    return folder.stat().st_mtime_ns, files


def no_building_leftovers(cache_dir):
    return not [p for p in cache_dir.iterdir() if p.name.startswith(".building-")]


def test_second_load_reuses_cache(sheets_dir, cache_dir, cache_folder, monkeypatch):
    """Loading again with the same sheets and cache returns the same folder without building anything."""
    before, listing = snapshot(cache_folder), sorted(p.name for p in cache_dir.iterdir())

    def no_build(*args, **kwargs):
        raise AssertionError("_build called although the cache is complete")
    monkeypatch.setattr(dsvae_lib, "_build", no_build)

    assert dsvae_lib.build_cache(sheets=sheets_dir, cache=cache_dir) == cache_folder
    for split, n in (("train", 9000), ("test", 2664)):
        assert len(dsvae_lib.load_sprites(split, sheets=sheets_dir, cache=cache_dir)) == n
    assert snapshot(cache_folder) == before
    assert sorted(p.name for p in cache_dir.iterdir()) == listing
    assert no_building_leftovers(cache_dir)
    assert {p.name for p in cache_folder.iterdir()} == {
        "manifest.json", "train_frames.npy", "train_character.npy", "test_frames.npy", "test_character.npy"}


def find_bare_body_pixel(sheets):
    """(y, x) in the walk-front frame-0 cell (row 10, column 8) where body/0 is opaque and every other layer
    variant used by the protocol is fully transparent: there, skin-0 characters show the body pixel as is."""
    body = np.asarray(Image.open(sheets / "body/0.png").convert("RGBA"))
    others = [sheets / f"{f}/{v}.png" for f in LAYERS[1:] for v in range(6)] + [sheets / "shoes/1.png"]
    cover = np.max([cell(np.asarray(Image.open(p).convert("RGBA")), 10, 8)[..., 3] for p in others], axis=0)
    ys, xs = np.nonzero((cell(body, 10, 8)[..., 3] == 255) & (cover == 0))
    assert len(ys), "no bare body pixel in this cell"
    return int(ys[0]), int(xs[0])


def diff_positions(a, b, chunk=500):
    """(sequence, frame, y, x) of every pixel where two frame arrays differ, compared in chunks."""
    hits = []
    for i in range(0, len(a), chunk):
        ca, cb = np.ascontiguousarray(a[i:i + chunk]), np.ascontiguousarray(b[i:i + chunk])
        seqs = np.flatnonzero((ca.reshape(len(ca), -1).view(np.uint64)  # fast: which sequences differ at all
                               != cb.reshape(len(cb), -1).view(np.uint64)).any(axis=1))
        for s in seqs:  # exact: where they differ
            hits += [(i + s, *pos) for pos in np.argwhere((ca[s] != cb[s]).any(axis=-1))]
    return np.array(hits, dtype=np.int64).reshape(-1, 4)


def test_changed_sheet_rebuilds_into_new_folder(tmp_path, copy_sheets, sheets_dir, cache_dir, cache_folder,
                                                train, test_split):
    """One altered pixel in body/0.png (verify=False) gives a new cache folder whose frames differ exactly
    at that pixel of walk-front frame 0 of every skin-0 character; the original folder is untouched."""
    before = snapshot(cache_folder)
    sheets = copy_sheets(tmp_path / "sheets")
    y, x = find_bare_body_pixel(sheets)
    body = Image.open(sheets / "body/0.png").convert("RGBA")
    px = (8 * 64 + x, 10 * 64 + y)  # (x, y) on the sheet: column 8, row 10
    old = body.getpixel(px)
    new = (255, 0, 255, 255) if old[:3] != (255, 0, 255) else (0, 255, 0, 255)
    body.putpixel(px, new)
    body.save(sheets / "body/0.png")

    with pytest.raises(SheetError, match="corrupted"):  # an edited sheet is refused unless verify=False
        dsvae_lib.build_cache(sheets=sheets, cache=cache_dir, verify=True)
    rebuilt = dsvae_lib.build_cache(sheets=sheets, cache=cache_dir, verify=False)
    try:
        assert rebuilt != cache_folder and rebuilt.parent == cache_dir
        assert (rebuilt / "manifest.json").is_file()
        assert no_building_leftovers(cache_dir)
        for split, orig in (("train", train), ("test", test_split)):
            changed = dsvae_lib.load_sprites(split, sheets=sheets, cache=cache_dir, verify=False)
            np.testing.assert_array_equal(changed.character, orig.character)
            hits = diff_positions(orig.frames, changed.frames)
            expected_seqs = np.flatnonzero((orig.attributes[:, 0] == 0) & (orig.action == ACTION["walk"])
                                           & (orig.direction == DIRECTION["front"]))
            assert len(expected_seqs) > 0
            np.testing.assert_array_equal(hits[:, 0], expected_seqs)
            assert (hits[:, 1:] == [0, y, x]).all()
            assert (np.asarray(changed.frames[expected_seqs, 0, y, x]) == new[:3]).all()
            assert (np.asarray(orig.frames[expected_seqs, 0, y, x]) == old[:3]).all()
            del changed
        assert snapshot(cache_folder) == before
        assert dsvae_lib.build_cache(sheets=sheets_dir, cache=cache_dir) == cache_folder
    finally:
        shutil.rmtree(rebuilt, ignore_errors=True)  # 1 GB; the session cache stays as it was


# ----------------------------------------------------------------------------- 6. model input
def test_to_model_input_scaling_and_round_trip(test_split):
    """float32 (B, T, 3, 64, 64) in [-1, 1]; 0 -> -1, 255 -> 1; to_uint8 inverts it exactly."""
    frames = np.asarray(test_split.frames[:4])
    x = dsvae_lib.to_model_input(frames)
    assert x.dtype == torch.float32 and tuple(x.shape) == (4, 8, 3, 64, 64)
    assert x.min() >= -1 and x.max() <= 1
    np.testing.assert_allclose(x.permute(0, 1, 3, 4, 2).numpy(), frames / 127.5 - 1, rtol=0, atol=1e-6)  # (C,H,W)
    np.testing.assert_array_equal(dsvae_lib.to_uint8(x), frames)

    every_value = np.arange(256, dtype=np.uint8).reshape(1, 1, 1, 256, 1).repeat(3, axis=-1)  # all byte values
    y = dsvae_lib.to_model_input(every_value)
    assert y[0, 0, :, 0, 0].tolist() == [-1.0] * 3 and y[0, 0, :, 0, 255].tolist() == [1.0] * 3
    assert (y[0, 0, 0, 0].diff() > 0).all()
    np.testing.assert_array_equal(dsvae_lib.to_uint8(y), every_value)


def test_batches_in_order(test_split):
    """Batches(shuffle=False, limit=10) yields ceil(10/4) (index, input) batches covering the first 10 in order."""
    batches = dsvae_lib.Batches(test_split, batch_size=4, shuffle=False, limit=10)
    got = list(batches)
    assert len(batches) == 3 and [len(x) for _, x in got] == [4, 4, 2]
    assert torch.cat([idx for idx, _ in got]).tolist() == list(range(10))
    expected = dsvae_lib.to_model_input(np.asarray(test_split.frames[:10]))
    torch.testing.assert_close(torch.cat([x for _, x in got]), expected, rtol=0, atol=0)


def test_batches_shuffled_cover_same_sequences(test_split):
    """Batches(shuffle=True) yields each of the first `limit` sequences once per epoch, with the right index;
    the order is fixed by (seed, epoch): the same pair repeats it, another epoch changes it."""
    batches = dsvae_lib.Batches(test_split, batch_size=3, shuffle=True, seed=1, limit=7)
    got = list(batches)
    order = torch.cat([idx for idx, _ in got])
    assert sorted(order.tolist()) == list(range(7)) and order.tolist() != list(range(7))
    expected = dsvae_lib.to_model_input(np.asarray(test_split.frames[:7]))
    torch.testing.assert_close(torch.cat([x for _, x in got]), expected[order], rtol=0, atol=0)

    again = dsvae_lib.Batches(test_split, batch_size=3, shuffle=True, seed=1, limit=7)
    assert torch.cat([idx for idx, _ in again]).tolist() == order.tolist()
    again.epoch = 1
    assert torch.cat([idx for idx, _ in again]).tolist() != order.tolist()


def test_batch_partners_are_frames_of_the_same_character_drawn_by_seed_and_epoch(test_split):
    """Batches.partners (f_partner): each sequence's partner is another sequence of its character among the first
    `limit`, given as model input; the epoch's generator fixes the draw, and another epoch draws afresh."""
    batches = dsvae_lib.Batches(test_split, batch_size=9, shuffle=True, seed=3, limit=90)  # 10 characters
    character = np.asarray(test_split.character[:90])
    frames = dsvae_lib.to_model_input(np.asarray(test_split.frames[:90]))
    idx, _ = next(iter(batches))
    got = batches.partners(idx, batches.generator())
    which = [int(np.flatnonzero([torch.equal(g, f) for f in frames])[0]) for g in got]  # the sequences drawn
    assert (character[which] == character[idx.numpy()]).all() and (np.array(which) != idx.numpy()).all()
    torch.testing.assert_close(got, batches.partners(idx, batches.generator()), rtol=0, atol=0)
    batches.epoch = 1
    assert not torch.equal(got, batches.partners(idx, batches.generator()))


def test_character_and_motion_encodings_invert_each_other():
    c = np.arange(dsvae_lib.N_CHARACTERS)
    assert (dsvae_lib.encode_character(*dsvae_lib.decode_character(c).T) == c).all()
    assert dsvae_lib.encode_character(5, 0, 0, 0) == 5 * 216 and dsvae_lib.encode_character(0, 0, 0, 5) == 5
    m = np.arange(dsvae_lib.N_MOTIONS)
    action, direction = dsvae_lib.decode_motion(m)
    assert (dsvae_lib.motion_index(action, direction) == m).all()
    assert dsvae_lib.MOTIONS[dsvae_lib.motion_index(2, 1)] == "slash-left"


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = dsvae_lib.atomic_write(tmp_path / "sub" / "a.bin", b"old")
    with pytest.raises(RuntimeError):
        dsvae_lib.atomic_write(path, lambda f: (f.write(b"half"), (_ for _ in ()).throw(RuntimeError("disk full"))))
    assert path.read_bytes() == b"old" and sorted(p.name for p in path.parent.iterdir()) == ["a.bin"]
    dsvae_lib.atomic_write(path, "new text")
    assert path.read_text() == "new text"


def test_attribute_colours_are_read_from_each_variants_own_layer(sheets_dir):
    """Six distinct mean colours per attribute, each with its Rec. 601 luma, from the real sheets."""
    table = dsvae_lib.attribute_colours(sheets_dir)
    assert table.shape == (len(dsvae_lib.ATTRIBUTES) * dsvae_lib.N_VARIANTS, 4)
    rgb = table[["R", "G", "B"]].to_numpy()
    assert ((0 <= rgb) & (rgb <= 255)).all()
    np.testing.assert_allclose(table["luma"], rgb @ [0.299, 0.587, 0.114])
    for a in dsvae_lib.ATTRIBUTES:
        colours = table.loc[a, ["R", "G", "B"]].to_numpy()
        distances = np.linalg.norm(colours[:, None] - colours[None], axis=-1)
        assert (distances + 1e3 * np.eye(dsvae_lib.N_VARIANTS)).min() > 10, a
