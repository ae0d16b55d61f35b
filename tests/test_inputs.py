"""Bad inputs: each is answered by a clear error that says what to do, or by the right behaviour."""

import dataclasses
import os
import stat

import numpy as np
import pytest
import torch
from conftest import VOCAB, tiny, tiny_hf

import specgate
import specgate.cache
import specgate.generation
import specgate.model
import specgate.speculative
from specgate.bench import mtbench_prompts
from specgate.cache import GROWTH, StaticKVCache
from specgate.generation import Sampling
from specgate.loading import load_hf, resolve
from specgate.speculative import SpecConfig

NO_EOS = dict(eos_token_id=None, pad_token_id=0)


def _prompt(T=7, seed=0):
    return torch.randint(3, VOCAB, (1, T), generator=torch.Generator().manual_seed(seed))


def _with_draft(draft: str):
    """A tiny Llama whose draft is perfect (skips nothing, output unscaled) or garbage (skips everything)."""
    m = tiny("llama", gates=True)
    m.gates.config = dataclasses.replace(m.gates.config, scale_output=draft != "perfect")
    m.gates.thresholds[0.5] = torch.full((2, 4), -1.0 if draft == "perfect" else 2.0)
    return m


def _record_caches(monkeypatch) -> dict:
    """The cache each decoding loop prefills, by module name."""
    caches = {}
    for module in (specgate.generation, specgate.speculative):
        original = module.prefill

        def prefill(*args, _original=original, _name=module.__name__, **kwargs):
            cache, logits = _original(*args, **kwargs)
            caches[_name] = cache
            return cache, logits

        monkeypatch.setattr(module, "prefill", prefill)
    return caches


# -- 1. max_new_tokens allocates nothing up front; the model's context ends generation -------------


def test_reserve_grows_in_chunks_keeps_the_entries_and_stops_at_most():
    cache = StaticKVCache(num_layers=2, batch=2, kv_heads=1, max_len=4, head_dim=3)
    k = torch.randn(2, 1, 4, 3)
    cache.k[1][:] = k
    cache.rewind([4, 3])
    cache.reserve(4, most=10_000)
    assert cache.max_len == 4  # room enough: nothing changes
    cache.reserve(5, most=10_000)
    assert cache.max_len == 4 + GROWTH and cache.k[1].shape == (2, 1, 4 + GROWTH, 3)
    assert torch.equal(cache.k[1][:, :, :4], k) and len(cache.k) == len(cache.v) == 2
    cache.reserve(4 + GROWTH + 1, most=10_000)
    assert cache.max_len == 2 * (4 + GROWTH)  # doubling once past the first chunk
    cache.reserve(1000, most=1000)
    assert cache.max_len == 1000 and torch.equal(cache.k[1][:, :, :4], k)
    with pytest.raises(ValueError, match="more than the 1000"):
        cache.reserve(1001, most=1000)


@pytest.mark.parametrize("speculative", [False, True])
def test_huge_max_new_tokens_allocates_only_a_chunk(monkeypatch, speculative):
    m = _with_draft("garbage")
    m.config.max_position_embeddings = 10**9  # no context cap: the cache alone must stay small
    ids = _prompt()
    eos = int(m.generate(ids, max_new_tokens=8, **NO_EOS)[0, -3])  # greedy output ends within 8 tokens
    kw = dict(eos_token_id=eos, pad_token_id=0, speculative=speculative, draft_budget=0.5)
    caches = _record_caches(monkeypatch)
    out = m.generate(ids, max_new_tokens=10**7, **kw)
    module = "specgate.speculative" if speculative else "specgate.generation"
    assert caches[module].max_len == ids.shape[1] + GROWTH
    assert out.shape[1] <= ids.shape[1] + 8
    assert torch.equal(out, m.generate(ids, max_new_tokens=50, **kw))


def test_growing_cache_keeps_plain_and_speculative_output_exact(monkeypatch):
    for module in (specgate.cache, specgate.generation):
        monkeypatch.setattr(module, "GROWTH", 4)  # the cache grows many times in a short run
    hf = tiny_hf("llama")
    ids = _prompt()
    n = 40
    ref = hf.generate(ids, max_new_tokens=n, do_sample=False, **NO_EOS)
    caches = _record_caches(monkeypatch)
    for draft in ("perfect", "garbage"):
        m = _with_draft(draft)
        assert torch.equal(m.generate(ids, max_new_tokens=n, **NO_EOS), ref)
        assert torch.equal(m.generate(ids, max_new_tokens=n, speculative=True, draft_budget=0.5, **NO_EOS), ref)
    for cache in caches.values():
        assert ids.shape[1] + 4 < cache.max_len <= ids.shape[1] + n + SpecConfig().max_draft + 2


@pytest.mark.parametrize("speculative", [False, True])
def test_generation_stops_at_the_context_length_with_a_warning(speculative):
    m = _with_draft("perfect")
    m.config.max_position_embeddings = 30
    ids = _prompt()
    with pytest.warns(UserWarning, match=r"max_new_tokens \(10000000\) exceed the model's context length \(30\)"):
        out = m.generate(ids, max_new_tokens=10**7, speculative=speculative, draft_budget=0.5, **NO_EOS)
    assert out.shape[1] == 30
    with pytest.raises(ValueError, match="longer than the model's context"):
        m.generate(_prompt(T=31), max_new_tokens=1)


# -- 2. sampling flags ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags,match",
    [
        (dict(temperature=0.0), "do_sample=False"),
        (dict(temperature=-0.5), "temperature must be > 0"),
        (dict(top_p=1.5), r"top_p must be in \[0, 1\]"),
        (dict(top_p=-0.1), r"top_p must be in \[0, 1\]"),
        (dict(top_k=-1), "top_k must be a whole number >= 0"),
        (dict(top_k=2.5), "top_k must be a whole number >= 0"),
    ],
)
def test_bad_sampling_flags_are_refused(flags, match):
    m = tiny()
    with pytest.raises(ValueError, match=match):
        m.generate(_prompt(), max_new_tokens=3, do_sample=True, **flags)


def test_greedy_decoding_ignores_the_sampling_flags_as_transformers_does():
    m = tiny()
    ids = _prompt()
    greedy = m.generate(ids, max_new_tokens=5, **NO_EOS)
    assert torch.equal(m.generate(ids, max_new_tokens=5, temperature=0.0, top_p=5.0, **NO_EOS), greedy)


def test_top_p_zero_keeps_the_most_likely_token_as_transformers_does():
    m = tiny()
    ids = _prompt()
    greedy = m.generate(ids, max_new_tokens=8, **NO_EOS)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(m.generate(ids, max_new_tokens=8, do_sample=True, top_p=0.0, generator=g, **NO_EOS), greedy)
    assert torch.equal(m.hf_model.generate(ids, max_new_tokens=8, do_sample=True, top_p=0.0, **NO_EOS), greedy)


def test_sampling_settings_are_passed_as_given_or_as_transformers_defaults(monkeypatch):
    seen = []
    monkeypatch.setattr(specgate.model, "plain_generate", lambda engine, ids, mask, out, sampling, gen: seen.append(sampling))
    m = tiny()
    m.generate(_prompt(), max_new_tokens=2, do_sample=True)
    m.generate(_prompt(), max_new_tokens=2, do_sample=True, temperature=0.5, top_k=0, top_p=0.3)
    assert seen == [Sampling(True, 1.0, 50, 1.0), Sampling(True, 0.5, 0, 0.3)]


# -- 3. eos_token_id in every form transformers takes -------------------------------------------------


@pytest.mark.parametrize("speculative", [False, True])
def test_eos_token_id_as_int_list_tuple_or_tensor(speculative):
    m = _with_draft("garbage")
    ids = _prompt()
    run = lambda eos, n=12: m.generate(ids, max_new_tokens=n, eos_token_id=eos, pad_token_id=0, speculative=speculative, draft_budget=0.5)  # noqa: E731
    full = run(None)[0, ids.shape[1] :].tolist()
    eos = full[4]
    other = next(t for t in range(3, VOCAB) if t not in full)
    want = run(eos)
    assert want.shape[1] == ids.shape[1] + full.index(eos) + 1  # it stops at the end token
    for form in (torch.tensor(eos), torch.tensor([other, eos]), [other, eos], (eos,), np.int64(eos)):
        assert torch.equal(run(form), want), form


# -- 4. short drafts --------------------------------------------------------------------------------


def test_max_draft_below_the_first_draft_length_works():
    assert SpecConfig().first_draft == 3 and SpecConfig(max_draft=2).first_draft == 2
    assert SpecConfig(max_draft=6, init_draft=5).first_draft == 5
    with pytest.raises(ValueError, match="init_draft must be between 1 and max_draft"):
        SpecConfig(max_draft=4, init_draft=5)
    with pytest.raises(ValueError, match="max_draft must be >= 1"):
        SpecConfig(max_draft=0)
    m = _with_draft("perfect")
    ids = _prompt()
    plain = m.generate(ids, max_new_tokens=20, **NO_EOS)
    for max_draft in (1, 2):
        out = m.generate(ids, max_new_tokens=20, speculative=True, draft_budget=0.5, max_draft=max_draft, return_dict_in_generate=True, **NO_EOS)
        assert torch.equal(out.sequences, plain)
        assert out.spec_stats.drafted == max_draft * out.spec_stats.rounds  # every round drafts max_draft
    hf = tiny_hf("llama")
    specgate.attach(hf, m.gates)
    out = hf.generate(ids, custom_generate=specgate.custom_generate, max_new_tokens=20, draft_budget=0.5, max_draft=2, do_sample=False, **NO_EOS)
    assert torch.equal(out, plain)


# -- 5. empty prompts, damaged files, unusable devices ------------------------------------------------


@pytest.mark.parametrize("speculative", [False, True])
def test_empty_prompt_is_refused(speculative):
    m = _with_draft("garbage")
    with pytest.raises(ValueError, match="the prompt is empty"):
        m.generate(torch.zeros(1, 0, dtype=torch.long), max_new_tokens=3, speculative=speculative, draft_budget=0.5)
    with pytest.raises(ValueError, match=r"input_ids must be \(batch, length\)"):
        m.generate(_prompt()[0], max_new_tokens=3)


@pytest.mark.parametrize("size", [5_000, 2_000_000])  # cut in the header / in the tensor data
def test_truncated_gguf_names_the_file_and_the_fix(tmp_path, size):
    folder, name = resolve("smollm2-135m-instruct")
    path = tmp_path / name
    with open(os.path.join(folder, name), "rb") as f:
        path.write_bytes(f.read(size))
    with pytest.raises(ValueError, match=f"{path} is truncated or corrupt.*download it again"):
        load_hf(str(path), torch.float32, "cpu")


def test_other_loading_errors_are_not_called_truncation(monkeypatch):
    import transformers

    def broken(*args, **kwargs):
        raise ValueError("GGUF model with architecture foo is not supported yet")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", broken)
    with pytest.raises(ValueError, match="not supported yet") as e:
        load_hf("smollm2-135m-instruct", torch.float32, "cpu")
    assert "truncated" not in str(e.value)


def test_truncated_gate_file_names_the_file_and_the_fix(tmp_path):
    m = tiny(gates=True)
    specgate.save_gates(m.gates, tmp_path / "g")
    weights = tmp_path / "g" / "gates.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError, match=f"{weights} is truncated or corrupt.*write it again"):
        specgate.load_gates(tmp_path / "g", m.config)


def test_unusable_device_is_refused_before_loading(monkeypatch):
    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(specgate.model, "load_hf", must_not_load)
    monkeypatch.setattr(specgate.model, "load_gates", must_not_load)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"finds no GPU.*pass device='cpu'"):
        specgate.load(device="cuda")
    with pytest.raises(ValueError, match="'gpu' is not a device: pass 'cpu', 'cuda'"):
        specgate.load(device="gpu")


# -- 6. gates for another model -----------------------------------------------------------------------


def test_attach_refuses_a_gateset_for_another_model():
    gates = tiny(gates=True).gates  # 4 layers, llama
    hf = tiny_hf("llama")
    hf.config.num_hidden_layers = 5
    with pytest.raises(ValueError, match="the given GateSet.*5 layers"):
        specgate.attach(hf, gates)
    with pytest.raises(ValueError, match="model_type 'llama'"):
        specgate.attach(tiny_hf("gemma3"), gates)


# -- 7. lengths ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags,match",
    [
        (dict(max_new_tokens=2.5), "max_new_tokens must be a whole number >= 0"),
        (dict(max_new_tokens=True), "max_new_tokens must be a whole number >= 0"),
        (dict(max_new_tokens=-1), "`max_new_tokens` must be greater than 0"),  # transformers' own check
        (dict(max_length=9.5), "max_length must be a whole number >= 0"),
        (dict(max_length=-3), "max_length must be a whole number >= 0"),
    ],
)
def test_lengths_must_be_whole_numbers(flags, match):
    with pytest.raises(ValueError, match=match):
        tiny().generate(_prompt(), **flags)


def test_length_forms_transformers_takes():
    m = tiny()
    ids = _prompt()
    assert m.generate(ids, max_new_tokens=np.int64(3), **NO_EOS).shape[1] == ids.shape[1] + 3
    assert m.generate(ids, max_length=10, **NO_EOS).shape[1] == 10
    with pytest.raises(ValueError, match="shorter than the prompt.*max_new_tokens"):
        m.generate(ids, max_length=5)
    with pytest.warns(UserWarning, match="20 tokens"):
        assert m.generate(ids, **NO_EOS).shape[1] == ids.shape[1] + 20  # transformers' default


# -- 8. MT-Bench prompt counts --------------------------------------------------------------------------


def test_mtbench_prompt_count_is_checked():
    assert len(mtbench_prompts()) == 80 and len(mtbench_prompts(3)) == 3
    for n in (0, -2, 81, 10_000, 2.5, True):
        with pytest.raises(ValueError, match="MT-Bench has 80 questions: ask for 1 to 80"):
            mtbench_prompts(n)


# -- 9. gate file permissions ---------------------------------------------------------------------------


def test_gate_files_follow_the_umask(tmp_path):
    m = tiny(gates=True)
    old = os.umask(0o022)
    try:
        specgate.save_gates(m.gates, tmp_path / "g")
    finally:
        os.umask(old)
    for name in ("gates.safetensors", "gate_config.json"):
        assert stat.S_IMODE((tmp_path / "g" / name).stat().st_mode) == 0o644, name
