"""Sampling: each logits transform against transformers' own processors, the sampler's distribution
against softmax, seeding, the OpenAI penalty arithmetic, and every validation message."""

import math

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from qwen15.engine.sampling import (
    Sampler,
    SamplingParams,
    _inverse_cdf,
    apply_min_p,
    apply_presence_frequency,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    log_softmax_topk,
    token_counts,
)
from qwen15.errors import GenerationError

B, V = 3, 1000


def chi2_critical(df: int) -> float:
    """Chi-square critical value at alpha = 1e-3 (Wilson-Hilferty; 18.5 for df 4, 43.8 for df 19).

    The tests are seeded, so they are deterministic; the threshold only says how far off is too far.
    """
    z = 3.0902  # the standard normal's 0.999 quantile
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def random_logits(scale: float = 3.0, seed: int = 0) -> torch.Tensor:
    return torch.randn(B, V, generator=torch.Generator().manual_seed(seed)) * scale


def random_ids(length: int = 60, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (B, length), generator=torch.Generator().manual_seed(seed))


def assert_same_survivors(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """Same set of surviving (finite) tokens, with the same values."""
    assert torch.equal(torch.isfinite(ours), torch.isfinite(theirs))
    kept = torch.isfinite(theirs)
    torch.testing.assert_close(ours[kept], theirs[kept], rtol=1e-6, atol=1e-6)
    assert kept.any(dim=-1).all()


def chi_square(samples: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic of integer samples against probs [V] (over the entries with p > 0), and its df."""
    counts = torch.bincount(samples.flatten(), minlength=probs.numel()).double()
    support = probs > 0
    assert counts[~support].sum() == 0, "sampled a token with probability 0"
    expected = probs[support].double() * samples.numel()
    return float(((counts[support] - expected) ** 2 / expected).sum()), int(support.sum()) - 1


# ---- each transform against transformers -------------------------------------------------------
@pytest.mark.parametrize("penalty", [0.5, 1.05, 1.3, 2.0])
def test_repetition_penalty_matches_transformers(penalty):
    logits, ids = random_logits(), random_ids()
    theirs = RepetitionPenaltyLogitsProcessor(penalty)(ids, logits.clone())
    assert_same_survivors(apply_repetition_penalty(logits, ids, penalty), theirs)
    # The sampler's penalty sees prompt + generated, given separately and as lists.
    sampler = Sampler(SamplingParams(repetition_penalty=penalty))
    prompt, generated = ids[:, :40].tolist(), ids[:, 40:].tolist()
    assert_same_survivors(sampler.penalise(logits, prompt, generated), theirs)
    assert not torch.equal(theirs, logits)  # the case does change something


@pytest.mark.parametrize("temperature", [0.3, 0.7, 1.5])
def test_temperature_matches_transformers(temperature):
    logits = random_logits()
    theirs = TemperatureLogitsWarper(temperature)(None, logits.clone())
    assert_same_survivors(apply_temperature(logits, temperature), theirs)


@pytest.mark.parametrize("k", [1, 5, 50, 999])
def test_top_k_matches_transformers(k):
    logits = random_logits()
    theirs = TopKLogitsWarper(k)(None, logits.clone())
    ours = apply_top_k(logits, k)
    assert_same_survivors(ours, theirs)
    assert (torch.isfinite(ours).sum(dim=-1) == k).all()


def test_top_k_keeps_ties_like_transformers():
    logits = torch.tensor([[5.0, 3.0, 3.0, 3.0, 1.0, 0.0]])
    theirs = TopKLogitsWarper(2)(None, logits.clone())
    assert_same_survivors(apply_top_k(logits, 2), theirs)
    assert torch.isfinite(theirs).sum() == 4


@pytest.mark.parametrize("p", [0.05, 0.3, 0.8, 0.95, 0.999])
@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_top_p_matches_transformers(p, scale):
    logits = random_logits(scale)
    theirs = TopPLogitsWarper(p)(None, logits.clone())
    assert_same_survivors(apply_top_p(logits, p), theirs)


def test_top_p_keeps_every_token_tied_with_the_last_kept_one():
    logits = torch.tensor([[2.0, 1.0, 1.0, 1.0, 0.0]])  # the top token alone has 0.45 < 0.5 of the mass
    kept = torch.isfinite(apply_top_p(logits, 0.5))
    assert kept.tolist() == [[True, True, True, True, False]]
    theirs = torch.isfinite(TopPLogitsWarper(0.5)(None, logits.clone()))
    assert theirs[0, 0] and not theirs[0, 4] and theirs[0, 1:4].any()  # transformers keeps some of the ties


@pytest.mark.parametrize("min_p", [0.01, 0.1, 0.5, 1.0])
def test_min_p_matches_transformers(min_p):
    logits = random_logits()
    theirs = MinPLogitsWarper(min_p)(None, logits.clone())
    assert_same_survivors(apply_min_p(logits, min_p), theirs)


@pytest.mark.parametrize("params", [
    dict(temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05),
    dict(temperature=1.3, top_p=0.9, min_p=0.05, repetition_penalty=1.2),
    dict(temperature=0.5, top_k=100, min_p=0.2),
])
def test_whole_chain_matches_transformers_in_generate_order(params):
    logits, ids = random_logits(), random_ids()
    theirs = logits.clone()
    theirs = RepetitionPenaltyLogitsProcessor(params.get("repetition_penalty", 1.0))(ids, theirs)
    theirs = TemperatureLogitsWarper(params["temperature"])(ids, theirs)
    if params.get("top_k"):
        theirs = TopKLogitsWarper(params["top_k"])(ids, theirs)
    if params.get("top_p"):
        theirs = TopPLogitsWarper(params["top_p"])(ids, theirs)
    if params.get("min_p"):
        theirs = MinPLogitsWarper(params["min_p"])(ids, theirs)
    ours = Sampler(SamplingParams(**params)).process(logits, ids[:, :30], ids[:, 30:])
    assert_same_survivors(ours, theirs)


# ---- presence / frequency (OpenAI: mu - c * frequency - [c > 0] * presence, over the output only) ----
def test_presence_and_frequency_penalty_by_hand():
    logits = torch.tensor([[1.0, 2.0, -1.0, 0.5, 3.0]])
    prompt = [1, 1, 1, 4]  # the prompt is not penalised by presence/frequency
    generated = [2, 2, 3, 2]  # counts: token 2 -> 3, token 3 -> 1
    sampler = Sampler(SamplingParams(presence_penalty=0.5, frequency_penalty=0.25))
    out = sampler.penalise(logits, prompt, generated)
    expected = torch.tensor([[1.0, 2.0, -1.0 - 0.5 - 3 * 0.25, 0.5 - 0.5 - 1 * 0.25, 3.0]])
    torch.testing.assert_close(out, expected)
    # Negative penalties encourage repetition.
    out = Sampler(SamplingParams(presence_penalty=-1.0, frequency_penalty=-0.5)).penalise(logits, prompt, generated)
    torch.testing.assert_close(out, torch.tensor([[1.0, 2.0, -1.0 + 1 + 1.5, 0.5 + 1 + 0.5, 3.0]]))


def test_repetition_penalty_comes_before_presence_penalty():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    sampler = Sampler(SamplingParams(repetition_penalty=2.0, presence_penalty=0.5))
    out = sampler.penalise(logits, prompt=[1], generated=[0])
    # token 0: 2 / 2 - 0.5 (the other order would give 0.75); token 1 (prompt only): -2 * 2.
    torch.testing.assert_close(out, torch.tensor([[0.5, -4.0, 1.0]]))


def test_token_counts_and_tensor_history_with_padding():
    counts = token_counts([[0, 2, 2, 7], []], 2, 5)  # 7 is outside the vocab: ignored
    torch.testing.assert_close(counts, torch.tensor([[1.0, 0, 2, 0, 0], [0, 0, 0, 0, 0]]))
    logits = random_logits()
    lists = [[5, 6, 6], [7], [8, 9]]
    padded = torch.tensor([[5, 6, 6], [7, -1, -1], [8, 9, -1]])
    sampler = Sampler(SamplingParams(repetition_penalty=1.5, presence_penalty=0.3, frequency_penalty=0.2))
    from_lists = sampler.penalise(logits, [[1, 2]] * 3, lists)
    from_tensor = sampler.penalise(logits, torch.tensor([[1, 2]] * 3), padded)
    torch.testing.assert_close(from_lists, from_tensor)
    assert not torch.equal(from_lists, logits)


def test_apply_presence_frequency_is_off_at_zero():
    logits = random_logits()
    assert apply_presence_frequency(logits, token_counts(random_ids(), B, V), 0.0, 0.0) is logits


# ---- greedy, seeding, distribution ---------------------------------------------------------------
def test_greedy_is_argmax_in_any_dtype():
    logits = random_logits()
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        tokens = Sampler(SamplingParams()).sample(logits.to(dtype))
        assert tokens.dtype == torch.long and tokens.shape == (B,)
        assert torch.equal(tokens, logits.to(dtype).float().argmax(dim=-1))


def test_greedy_applies_the_repetition_penalty():
    logits = torch.tensor([[4.0, 3.0, 0.0]])
    assert Sampler(SamplingParams(repetition_penalty=2.0)).sample(logits, [0], []).item() == 1


def test_top_k_1_equals_greedy():
    logits = random_logits()
    for seed in range(5):
        sampled = Sampler(SamplingParams(temperature=1.0, top_k=1, seed=seed)).sample(logits)
        assert torch.equal(sampled, logits.argmax(dim=-1))


def draw_many(params: SamplingParams, logits: torch.Tensor, steps: int = 40) -> list[list[int]]:
    sampler = Sampler(params)
    return [sampler.sample(logits).tolist() for _ in range(steps)]


@pytest.mark.parametrize("extra", [{}, {"top_k": 50}, {"top_p": 0.95}, {"min_p": 0.01}])
def test_same_seed_same_tokens_different_seed_different_tokens(extra):
    logits = random_logits(scale=1.0)
    a = draw_many(SamplingParams(temperature=1.0, seed=123, **extra), logits)
    b = draw_many(SamplingParams(temperature=1.0, seed=123, **extra), logits)
    c = draw_many(SamplingParams(temperature=1.0, seed=124, **extra), logits)
    assert a == b
    assert a != c


def test_no_seed_gives_fresh_seeds():
    logits = random_logits(scale=1.0)
    one, two = Sampler(SamplingParams(temperature=1.0)), Sampler(SamplingParams(temperature=1.0))
    assert one.seed != two.seed
    assert [one.sample(logits).tolist() for _ in range(20)] != [two.sample(logits).tolist() for _ in range(20)]


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_empirical_distribution_matches_softmax(temperature):
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    n = 20_000
    samples = Sampler(SamplingParams(temperature=temperature, seed=0)).sample(logits.expand(n, -1))
    probs = torch.softmax(logits / temperature, dim=-1)
    stat, df = chi_square(samples, probs)
    assert stat < chi2_critical(df), (stat, samples.bincount(minlength=5) / n, probs)
    freq = samples.bincount(minlength=5).double() / n
    assert (freq - probs.double()).abs().max() < 0.015


@pytest.mark.parametrize("params", [
    dict(temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.05),  # Qwen's chat defaults
    dict(temperature=1.0, top_k=8),
    dict(temperature=1.0, top_p=0.9),  # top-p alone: candidates found by top-k, no full sort
    dict(temperature=5.0, top_p=0.9),  # flat: falls back to sorting the vocab
    dict(temperature=1.0, min_p=0.1),
    dict(temperature=0.8, top_k=200, top_p=0.7, min_p=0.05),
])
def test_sampler_draws_from_softmax_of_process(params):
    """sample() takes shortcuts (top-k slices, top-p candidates); it must still draw from softmax(process())."""
    logits = torch.randn(1, V, generator=torch.Generator().manual_seed(5)) * 2.5
    prompt, generated = [3, 4, 5], [int(logits.argmax())]
    sampler = Sampler(SamplingParams(seed=1, **params))
    probs = torch.softmax(sampler.process(logits, prompt, generated), dim=-1)[0]
    n = 20_000
    samples = sampler.sample(logits.expand(n, -1), [prompt] * n, [generated] * n)
    # Pool the rare tokens so that every cell expects >= 5 samples.
    order = probs.argsort(descending=True)
    common = order[probs[order] * n >= 5][:19]
    pooled = torch.zeros(len(common) + 1, dtype=torch.double)
    pooled[:-1] = probs[common].double()
    pooled[-1] = 1 - pooled[:-1].sum()
    cell = torch.full((V,), len(common), dtype=torch.long)
    cell[common] = torch.arange(len(common))
    assert probs[samples].min() > 0, "sampled a removed token"
    if pooled[-1] * n < 5:  # nothing left to pool: drop the empty cell
        pooled = pooled[:-1] / pooled[:-1].sum()
    stat, df = chi_square(cell[samples], pooled.float())
    assert stat < chi2_critical(df), stat


@pytest.mark.parametrize("params", [
    dict(temperature=0.7, top_k=20, top_p=0.8),
    dict(temperature=0.7, top_k=20, top_p=0.8, min_p=0.1),
    dict(temperature=1.0, top_k=300),
    dict(temperature=1.0, top_p=0.5),
    dict(temperature=1.0, top_p=0.9, min_p=0.02),
    dict(temperature=0.3, top_p=0.999),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # bf16: ties at the k-th logit
def test_sample_shortcuts_keep_exactly_the_tokens_process_keeps(params, dtype):
    """sample() works on a top-k slice or top-p candidates; scattered back, they must equal process()."""
    vocab = 5000  # > the 256 / 4096 top-p candidates, so those paths run
    logits = (torch.randn(4, vocab, generator=torch.Generator().manual_seed(2)) * 4).to(dtype)
    logits[1] = logits[1].round()  # many ties in this row only
    sampler = Sampler(SamplingParams(**params))
    reference = sampler.process(logits)
    values, ids = sampler._candidates(apply_temperature(logits.float(), params["temperature"]))
    full = torch.full_like(reference, float("-inf")) if ids is not None else values
    if ids is not None:
        full = full.scatter(-1, ids, values)
        assert ids.shape[-1] < vocab
    assert torch.equal(torch.isfinite(full), torch.isfinite(reference))
    torch.testing.assert_close(torch.softmax(full, -1), torch.softmax(reference, -1), rtol=1e-5, atol=1e-7)


def test_sampler_keeps_ties_at_the_kth_logit():
    logits = torch.tensor([[3.0, 1.0, 1.0, 1.0, 0.0, -1.0]])
    n = 6000
    samples = Sampler(SamplingParams(temperature=1.0, top_k=2, seed=0)).sample(logits.expand(n, -1))
    probs = torch.softmax(apply_top_k(logits, 2), dim=-1)[0]  # tokens 0..3 survive
    stat, df = chi_square(samples, probs)
    assert df == 3 and stat < chi2_critical(df)


def test_min_p_and_top_p_never_remove_the_argmax():
    gen = torch.Generator().manual_seed(11)
    for trial in range(60):
        logits = torch.randn(B, V, generator=gen) * float(torch.rand(1, generator=gen) * 20)
        top = logits.argmax(dim=-1, keepdim=True)
        for p in (1e-6, 0.01, 0.5):
            assert torch.isfinite(apply_top_p(logits, p).gather(-1, top)).all()
        for m in (0.5, 0.999, 1.0):
            assert torch.isfinite(apply_min_p(logits, m).gather(-1, top)).all()
    # Tiny p or min_p 1 on distinct logits: only the argmax is left, and sampling becomes greedy.
    logits = random_logits()
    for params in (dict(top_p=1e-6), dict(min_p=1.0), dict(top_k=50, top_p=1e-6)):
        sampled = Sampler(SamplingParams(temperature=1.0, seed=3, **params)).sample(logits)
        assert torch.equal(sampled, logits.argmax(dim=-1)), params


def test_inverse_cdf_never_picks_a_zero_probability_token():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0, 0.0]])
    for u in (0.0, 0.25, 0.5 - 1e-7, 0.5, 0.75, 1 - 2**-24, 1.0):  # 1.0: as if u * total rounded up
        picked = _inverse_cdf(probs, torch.tensor([[u]])).item()
        assert picked == (1 if u < 0.5 else 3), u


def test_sample_accepts_a_flat_history_for_one_row():
    logits = torch.tensor([[4.0, 3.0, 0.0]])
    sampler = Sampler(SamplingParams(repetition_penalty=2.0))
    assert sampler.sample(logits, [0, 0], [2]).tolist() == [1]
    with pytest.raises(ValueError, match="one list of token ids per row"):
        sampler.sample(random_logits(), [[1], [2]], None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_logits_sample_on_the_device_and_reproduce():
    logits = random_logits(scale=1.0).cuda()
    a = draw_many(SamplingParams.chat_defaults(seed=5), logits, 10)
    b = draw_many(SamplingParams.chat_defaults(seed=5), logits, 10)
    assert a == b
    out = Sampler(SamplingParams(temperature=1.0, seed=1)).sample(logits, [[1]] * B, [[2]] * B)
    assert out.device.type == "cuda"


# ---- logprobs helper ----------------------------------------------------------------------------
def test_log_softmax_topk():
    logits = random_logits().bfloat16()
    chosen = torch.tensor([0, 5, 999])
    token_lp, top_ids, top_lp = log_softmax_topk(logits, chosen, 4)
    reference = torch.log_softmax(logits.float(), dim=-1)
    torch.testing.assert_close(token_lp, reference[torch.arange(B), chosen])
    # bf16 logits tie, so check the values and that the ids carry them (not one particular tie order).
    torch.testing.assert_close(top_lp, reference.sort(dim=-1, descending=True).values[:, :4])
    torch.testing.assert_close(reference.gather(-1, top_ids), top_lp)
    assert (top_ids.sort(dim=-1).values.diff(dim=-1) > 0).all()  # distinct
    assert top_lp.dtype == torch.float32
    _, ids0, lp0 = log_softmax_topk(logits, chosen, 0)
    assert ids0.shape == (B, 0) and lp0.shape == (B, 0)


# ---- params ---------------------------------------------------------------------------------------
def test_chat_defaults_are_qwens():
    p = SamplingParams.chat_defaults()
    assert (p.temperature, p.top_p, p.top_k, p.repetition_penalty) == (0.7, 0.8, 20, 1.05)
    assert SamplingParams.chat_defaults(seed=3, top_k=5).top_k == 5
    assert SamplingParams().greedy and not p.greedy
    assert SamplingParams(stop="###").stop == ["###"]


@pytest.mark.parametrize("field,value,message", [
    ("temperature", -1.0, "temperature must be >= 0, got -1.0"),
    ("temperature", float("nan"), "temperature must be >= 0, got nan"),
    ("temperature", "hot", "temperature must be >= 0, got 'hot'"),
    ("top_k", -1, "top_k must be an integer >= 0, got -1"),
    ("top_k", 2.5, "top_k must be an integer >= 0, got 2.5"),
    ("top_p", 0.0, "top_p must be in (0, 1], got 0.0"),
    ("top_p", 1.5, "top_p must be in (0, 1], got 1.5"),
    ("min_p", -0.1, "min_p must be in [0, 1], got -0.1"),
    ("min_p", 1.1, "min_p must be in [0, 1], got 1.1"),
    ("repetition_penalty", 0.0, "repetition_penalty must be > 0, got 0.0"),
    ("repetition_penalty", float("inf"), "repetition_penalty must be > 0, got inf"),
    ("presence_penalty", 2.5, "presence_penalty must be in [-2, 2], got 2.5"),
    ("frequency_penalty", -3, "frequency_penalty must be in [-2, 2], got -3"),
    ("max_tokens", -1, "max_tokens must be an integer >= 0, got -1"),
    ("max_tokens", 10.0, "max_tokens must be an integer >= 0, got 10.0"),
    ("max_tokens", True, "max_tokens must be an integer >= 0, got True"),
    ("seed", 1.5, "seed must be an integer or None, got 1.5"),
    ("seed", 2**64, "seed must be an integer in [-2**63, 2**64) or None, got 18446744073709551616"),
    ("stop", [1], "stop must be a list of non-empty strings, got [1]"),
    ("stop", [""], "stop must be a list of non-empty strings, got ['']"),
    ("stop", ("a",), "stop must be a list of non-empty strings, got ('a',)"),
    ("stop_token_ids", 5, "stop_token_ids must be a list of token ids (integers >= 0) or None, got 5"),
    ("stop_token_ids", [-1], "stop_token_ids must be a list of token ids (integers >= 0) or None, got [-1]"),
    ("ignore_eos", "yes", "ignore_eos must be True or False, got 'yes'"),
])
def test_validation_messages(field, value, message):
    with pytest.raises(GenerationError) as info:
        SamplingParams(**{field: value})
    assert str(info.value) == message
    assert "\n" not in str(info.value)


def test_validate_catches_values_set_after_construction():
    params = SamplingParams()
    params.top_p = 0.0
    with pytest.raises(GenerationError, match=r"top_p must be in \(0, 1\], got 0.0"):
        params.validate()


def test_edge_values_are_accepted():
    SamplingParams(temperature=0, top_k=0, top_p=1, min_p=1, repetition_penalty=1e-3, presence_penalty=-2,
                   frequency_penalty=2, max_tokens=0, seed=-(2**63), stop=[], stop_token_ids=[])
    assert not math.isnan(SamplingParams(seed=2**64 - 1).temperature)
