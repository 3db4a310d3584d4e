"""hpcflow.rng: the replicas' streams; Philox4x32-10 against Random123's known answers and
an independent uint64 reference, its normals' distribution, rank-count independence,
resumption, and a production drawing from it."""

import math

import h5py
import numpy as np
import pytest
import torch

from conftest import chain_datasets as chains, write_input
from hpcflow import rng, run
from hpcflow.rng import PhiloxStreams, ReplicaStreams

#: Random123 kat_vectors: philox4x32 10, counter (4 words), key (2 words) -> output.
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def philox_reference(ctr, key, rounds=10):
    """Philox4x32 in numpy uint64 (the 32 x 32 -> 64-bit products fit exactly): written
    from the published round, independently of the 16-bit splitting in hpcflow.rng."""
    c = [np.asarray(x, dtype=np.uint64) for x in ctr]
    k0, k1 = (np.asarray(x, dtype=np.uint64) for x in key)
    m0, m1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
    mask = np.uint64(0xFFFFFFFF)
    for r in range(rounds):
        if r:
            k0, k1 = (k0 + np.uint64(0x9E3779B9)) & mask, (k1 + np.uint64(0xBB67AE85)) & mask
        p0, p1 = m0 * c[0], m1 * c[2]
        c = [(p1 >> np.uint64(32)) ^ c[1] ^ k0, p1 & mask, (p0 >> np.uint64(32)) ^ c[3] ^ k1, p0 & mask]
    return c


@pytest.mark.parametrize("ctr,key,expected", KAT)
def test_philox_known_answers(ctr, key, expected):
    out = rng.philox4x32(*(torch.tensor([x]) for x in ctr), *(torch.tensor([x]) for x in key))
    assert [int(o) for o in out] == list(expected)
    assert [int(o) for o in philox_reference(ctr, key)] == list(expected)


def test_philox_matches_the_uint64_reference_on_random_words():
    words = np.random.default_rng(0).integers(0, 2 ** 32, (6, 4096), dtype=np.uint64)
    ours = rng.philox4x32(*(torch.from_numpy(w.astype(np.int64)) for w in words))
    ref = philox_reference(words[:4], words[4:])
    for a, b in zip(ours, ref):
        np.testing.assert_array_equal(a.numpy(), b.astype(np.int64))


def test_uniforms_are_53_bit_and_built_from_the_block_words():
    counter = torch.tensor([0, 5, 2 ** 40 + 3], dtype=torch.int64)
    key = torch.tensor([[1, 2], [3, 4], [0xFFFFFFFF, 0]], dtype=torch.int64)
    u = rng.philox_uniforms(counter, key, 8).numpy()
    assert u.shape == (3, 16) and (u >= 0).all() and (u < 1).all()
    k = u * 2.0 ** 53
    np.testing.assert_array_equal(k, np.floor(k))
    c = counter.numpy()[:, None].astype(np.uint64) + np.arange(8, dtype=np.uint64)
    x = philox_reference((c & np.uint64(0xFFFFFFFF), c >> np.uint64(32), 0 * c, 0 * c),
                         (key.numpy()[:, :1].astype(np.uint64), key.numpy()[:, 1:].astype(np.uint64)))
    x = [w.astype(np.int64) for w in x]
    expected = np.concatenate(((x[0] >> 5) * 2 ** 26 + (x[1] >> 6), (x[2] >> 5) * 2 ** 26 + (x[3] >> 6)), 1)
    np.testing.assert_array_equal(k.astype(np.int64), expected)


def test_normals_are_standard_normal():
    """2^20 normals of 16 replicas: mean, variance, fourth moment, the correlation of the
    cos and sin halves and the Kolmogorov-Smirnov distance, within 5 sigma (seed fixed)."""
    from scipy import stats

    z = PhiloxStreams(11, range(16), "moments").normal((256, 256)).numpy()
    n = z.size
    flat = z.ravel()
    assert abs(flat.mean()) < 5 / math.sqrt(n)
    assert abs(flat.var() - 1) < 5 * math.sqrt(2 / n)
    assert abs((flat ** 4).mean() - 3) < 5 * math.sqrt(96 / n)
    half = z.reshape(16, 2, -1)  # rows: r cos, then r sin of the same blocks
    corr = (half[:, 0] * half[:, 1]).mean()
    assert abs(corr) < 5 / math.sqrt(n / 2)
    ks = stats.kstest(flat, "norm")
    assert ks.statistic < 1.95 / math.sqrt(n)  # the 0.1 % critical value
    log_u = PhiloxStreams(12, range(4096), "moments").log_uniform().numpy()
    assert (log_u <= 0).all()
    assert abs(np.exp(log_u).mean() - 0.5) < 5 * math.sqrt(1 / 12 / 4096)


def test_counters_advance_by_padded_blocks():
    s = PhiloxStreams(3, range(2), "pad")
    s.normal((6, 6))                 # 36 normals: one 64-number draw, 32 blocks
    assert s.get_state()[:, 0].tolist() == [32, 32]
    s.normal((16, 16))               # 256 normals: 128 blocks
    s.log_uniform()                  # 16 numbers: 8 blocks
    assert s.get_state()[:, 0].tolist() == [168, 168]


@pytest.mark.parametrize("shape", [(6, 6), (16, 16), (5,)])
def test_a_replica_draws_the_same_numbers_in_any_batch(shape):
    """Replica i's numbers do not depend on which replicas share its rank (so not on the
    rank count): every row padded to whole SIMD vectors."""
    whole = PhiloxStreams(9, range(13), "batch")
    z, log_u = whole.normal(shape), whole.log_uniform()
    for block in (range(0, 1), range(3, 8), range(12, 13), range(1, 13)):
        part = PhiloxStreams(9, block, "batch")
        torch.testing.assert_close(part.normal(shape), z[block.start:block.stop], rtol=0, atol=0)
        torch.testing.assert_close(part.log_uniform(), log_u[block.start:block.stop], rtol=0, atol=0)


@pytest.mark.parametrize("generator", rng.GENERATORS)
def test_momenta_are_normal_then_log_uniform(generator):
    """One trajectory's draw in one call: the numbers of normal() then log_uniform()."""
    a, b = (rng.streams(generator, 6, range(5), "momenta") for _ in range(2))
    for _ in range(2):
        pi, log_u = a.momenta((6, 6), "cpu")
        torch.testing.assert_close(pi, b.normal((6, 6), "cpu"), rtol=0, atol=0)
        torch.testing.assert_close(log_u, b.log_uniform("cpu"), rtol=0, atol=0)
    np.testing.assert_array_equal(a.get_state(), b.get_state())


def test_state_round_trip_resumes_the_streams():
    a = PhiloxStreams(4, range(3), "resume")
    a.normal((4, 4))
    rows = a.get_state()
    b = PhiloxStreams(4, range(3), "resume")
    b.set_state(rows)
    torch.testing.assert_close(b.normal((4, 4)), a.normal((4, 4)), rtol=0, atol=0)
    torch.testing.assert_close(b.log_uniform(), a.log_uniform(), rtol=0, atol=0)


def test_set_state_refuses_other_streams():
    philox = PhiloxStreams(4, range(3), "resume")
    with pytest.raises(ValueError, match="not Philox streams"):
        philox.set_state(ReplicaStreams(4, range(3), "resume").get_state())
    with pytest.raises(ValueError, match="seed 4"):
        philox.set_state(PhiloxStreams(5, range(3), "resume").get_state())
    with pytest.raises(ValueError, match="not Philox streams"):
        philox.set_state(PhiloxStreams(4, range(1, 4), "resume").get_state())


def test_streams_factory():
    assert isinstance(rng.streams("pcg64", 1, range(2), "x"), ReplicaStreams)
    assert isinstance(rng.streams("philox", 1, range(2), "x"), PhiloxStreams)
    with pytest.raises(ValueError, match="rng must be one of"):
        rng.streams("mt19937", 1, range(2), "x")


def compiled_streams(*args):
    s = PhiloxStreams(*args, compiled=True)
    try:
        s.warm_up((6, 6))
    except Exception as err:  # no working C++ compiler: what inductor raises varies
        pytest.skip(f"torch.compile unavailable here: {type(err).__name__}")
    return s


@pytest.mark.slow
def test_compiled_draws_agree_with_eager_and_do_not_recompile():
    """Compiled: the same numbers as eager to a few ulps (libm vs vectorised transcendental
    functions), bit for bit in any batch, one graph per draw shape."""
    c = compiled_streams(2, range(7), "compiled")
    e = PhiloxStreams(2, range(7), "compiled")
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(3):
            zc, ze = c.normal((6, 6)), e.normal((6, 6))
            torch.testing.assert_close(zc, ze, rtol=0, atol=4 * 2.0 ** -52 * float(ze.abs().max()))
            torch.testing.assert_close(c.log_uniform(), e.log_uniform(), rtol=1e-15, atol=1e-15)
            (pc, lc), (pe, le) = c.momenta((6, 6)), e.momenta((6, 6))
            torch.testing.assert_close(pc, pe, rtol=0, atol=4 * 2.0 ** -52 * float(pe.abs().max()))
            torch.testing.assert_close(lc, le, rtol=1e-15, atol=1e-15)
    # each draw compiled once (the counters are tensors, the block counts part of the
    # signature) and called directly since (hpcflow.fused.CompiledGraph)
    for graph in (c._normals, c._log_uniforms, c._momenta):
        assert graph.dynamo_calls == 1 and graph.direct_calls >= 2, (graph.fn, graph.direct_calls)
    twin = PhiloxStreams(2, range(7), "compiled", compiled=True)
    twin.set_state(c.get_state())
    pi, log_u = c.momenta((6, 6))
    torch.testing.assert_close(twin.normal((6, 6)), pi, rtol=0, atol=0)  # one graph or two
    torch.testing.assert_close(twin.log_uniform(), log_u, rtol=0, atol=0)
    part = PhiloxStreams(2, range(2, 5), "compiled", compiled=True)  # another batch shape
    part.set_state(c.get_state()[2:5])
    torch.testing.assert_close(part.normal((6, 6)), c.normal((6, 6))[2:5], rtol=0, atol=0)
    assert zc.is_contiguous()


# ---------------------------------------------------------------------------------------
# Productions with [run] rng = philox


def philox_input(directory, compile_mode="off", **kw):
    path = write_input(directory, **({"L": 6, "replicas": 5, "trajectories": 20} | kw))
    path.write_text(path.read_text().replace(
        "[run]\n", f"[run]\nrng = philox\ncompile = {compile_mode}\n", 1))
    return path


def test_philox_production_resumes_bit_identically(tmp_path):
    """A run cut after its first checkpoint and resumed = the run done in one go."""
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    whole = philox_input(tmp_path / "one")
    assert run.main([str(whole), "--quiet"]) == 0
    cut = philox_input(tmp_path / "two", trajectories=10)
    assert run.main([str(cut), "--quiet"]) == 0
    cut.write_text(cut.read_text().replace("trajectories = 10", "trajectories = 20"))
    assert run.main([str(cut), "--quiet"]) == 0
    a, b = chains(tmp_path / "one" / "out" / "hmc.h5"), chains(tmp_path / "two" / "out" / "hmc.h5")
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    with h5py.File(tmp_path / "one" / "out" / "hmc.h5") as f:
        assert '"[run] rng": "philox"' in f.attrs["identity"]
        assert (f["checkpoint/slot_rng"][()][..., 3] == rng.PHILOX_TAG).all()


def test_philox_and_pcg64_chains_differ_but_agree_statistically(tmp_path):
    """Other numbers, the same physics: <exp(-dH)> = 1 within 5 sigma for both."""
    (tmp_path / "p").mkdir()
    (tmp_path / "q").mkdir()
    kw = dict(L=6, replicas=8, trajectories=200, save_every=0)
    ph = philox_input(tmp_path / "p", **kw)
    pc = write_input(tmp_path / "q", **kw)
    assert run.main([str(ph), "--quiet"]) == 0 and run.main([str(pc), "--quiet"]) == 0
    a, b = chains(tmp_path / "p" / "out" / "hmc.h5"), chains(tmp_path / "q" / "out" / "hmc.h5")
    assert not np.array_equal(a["observables/M"], b["observables/M"])
    for c in (a, b):
        w = np.exp(-c["mc/dH"])
        assert abs(w.mean() - 1) < 5 * w.std() / math.sqrt(w.size)


def test_switching_generator_on_resume_is_refused(tmp_path, capsys):
    path = write_input(tmp_path, L=6, trajectories=10)
    assert run.main([str(path), "--quiet"]) == 0
    h5 = tmp_path / "out" / "hmc.h5"
    before = h5.stat().st_mtime_ns
    path.write_text(path.read_text().replace("trajectories = 10", "trajectories = 20")
                    .replace("[run]\n", "[run]\nrng = philox\n", 1))
    capsys.readouterr()
    assert run.main([str(path), "--quiet"]) == 2
    assert "[run] rng was 'pcg64', now 'philox'" in capsys.readouterr().err
    assert h5.stat().st_mtime_ns == before


def test_a_file_from_before_the_key_counts_as_pcg64(tmp_path, capsys):
    """Files made before [run] rng have no such identity key: they were PCG64 chains, so
    they resume with pcg64 and refuse philox."""
    import json

    path = write_input(tmp_path, L=6, trajectories=10)
    assert run.main([str(path), "--quiet"]) == 0
    h5 = tmp_path / "out" / "hmc.h5"
    with h5py.File(h5, "r+") as f:
        ident = json.loads(f.attrs["identity"])
        del ident["[run] rng"]
        f.attrs["identity"] = json.dumps(ident, sort_keys=True)
    more = path.read_text().replace("trajectories = 10", "trajectories = 12")
    path.write_text(more.replace("[run]\n", "[run]\nrng = philox\n", 1))
    capsys.readouterr()
    assert run.main([str(path), "--quiet"]) == 2
    assert "[run] rng was 'pcg64', now 'philox'" in capsys.readouterr().err
    path.write_text(more)
    assert run.main([str(path), "--quiet"]) == 0


@pytest.mark.slow
def test_compiled_philox_production_matches_eager_to_rounding(tmp_path):
    """compile = on draws through compiled Philox and runs the fused trajectory: the chains
    of compile = off to rounding, the same accept decisions."""
    dirs = [tmp_path / "eager", tmp_path / "fused"]
    for d, mode in zip(dirs, ("off", "on")):
        d.mkdir()
        assert run.main([str(philox_input(d, mode)), "--quiet"]) == 0
    a, b = (chains(d / "out" / "hmc.h5") for d in dirs)
    np.testing.assert_array_equal(a["mc/accepted"], b["mc/accepted"])
    np.testing.assert_allclose(b["configs"], a["configs"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(b["observables/M"], a["observables/M"], rtol=0, atol=1e-12)


def test_philox_without_a_compiler(tmp_path, monkeypatch, capsys):
    """compile = on: exit 2 naming the key (the Philox draws are compiled first); auto: one
    line each for the draws and the trajectory, then eager, the chains of compile = off."""
    def refuse(fn, **kw):
        def broken(*args):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\ndetails...")
        return broken

    (tmp_path / "off").mkdir()
    off = philox_input(tmp_path / "off", "off")
    assert run.main([str(off), "--quiet"]) == 0
    monkeypatch.setattr(torch, "compile", refuse)
    (tmp_path / "on").mkdir()
    on = philox_input(tmp_path / "on", "on")
    capsys.readouterr()
    assert run.main([str(on)]) == 2
    err = capsys.readouterr().err
    assert "[run] compile = on: the Philox draws: torch.compile failed: RuntimeError: " \
           "InvalidCxxCompiler: No working C++ compiler found" in err and "details" not in err
    assert not (tmp_path / "on" / "out" / "hmc.h5").exists()
    on.write_text(on.read_text().replace("compile = on", "compile = auto"))
    assert run.main([str(on)]) == 0
    out = capsys.readouterr()
    lines = [ln for ln in (out.out + out.err).splitlines() if "torch.compile failed" in ln]
    assert len(lines) == 2 and "drawing eager" in lines[0] and "using the eager path" in lines[1], lines
    a, b = chains(tmp_path / "off" / "out" / "hmc.h5"), chains(tmp_path / "on" / "out" / "hmc.h5")
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_philox_on_cuda_matches_the_cpu():
    """The same words on a GPU (integer arithmetic: exact), the same normals to a few ulp,
    the counters on the device; compiled as a production compiles it."""
    cpu = PhiloxStreams(8, range(64), "cuda")
    gpu = PhiloxStreams(8, range(64), "cuda", device="cuda", compiled=True)
    gpu.warm_up((16, 16))
    words_cpu = rng.philox_uniforms(cpu.counter, cpu.key, 128)
    words_gpu = rng.philox_uniforms(gpu.counter, gpu.key, 128)
    torch.testing.assert_close(words_gpu.cpu(), words_cpu, rtol=0, atol=0)
    (pi_g, lu_g), (pi_c, lu_c) = gpu.momenta((16, 16)), cpu.momenta((16, 16))
    assert pi_g.device.type == "cuda" and gpu.counter.device.type == "cuda"
    torch.testing.assert_close(pi_g.cpu(), pi_c, rtol=0, atol=8 * 2.0 ** -52 * float(pi_c.abs().max()))
    torch.testing.assert_close(lu_g.cpu(), lu_c, rtol=1e-14, atol=1e-14)
    np.testing.assert_array_equal(gpu.get_state(), cpu.get_state())
