"""generate() and transformers' caches with the sparse backend: incremental decoding equals the
full forward, left-padded batches equal single prompts, beam search scores what the full forward
scores, sampling is seeded."""
import pytest
import torch
from transformers import DynamicCache

from moh.core.attention import set_backend
from moh.hf.compat import CACHE_NAME, output_cache

PROMPT = torch.randint(3, 61, (1, 7), generator=torch.Generator().manual_seed(1))


def test_incremental_decoding_equals_the_full_forward(model):
    assert model.config.backend == "sparse" and model.config.router == "two_stage"
    ids = torch.randint(0, 61, (2, 13), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids).logits
        cache = DynamicCache(config=model.config)
        steps = [model(ids[:, :7], past_key_values=cache, use_cache=True).logits]
        for t in range(7, 13):
            out = model(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
            assert output_cache(out) is cache and cache.get_seq_length() == t + 1
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_the_cache_goes_by_either_name(model):
    """transformers 5.24 renamed past_key_values to cache: both names feed the same cache."""
    ids = torch.randint(0, 61, (1, 5), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        logits = []
        for name in ("cache", "past_key_values"):
            cache = DynamicCache(config=model.config)
            model(ids[:, :4], use_cache=True, **{name: cache})
            assert cache.get_seq_length() == 4
            logits.append(model(ids[:, 4:], use_cache=True, **{name: cache}).logits)
        torch.testing.assert_close(logits[0], logits[1])
        with pytest.raises(ValueError, match="not both"):
            model(ids, cache=DynamicCache(config=model.config), past_key_values=DynamicCache(config=model.config))


def test_left_padded_batch_generates_what_each_prompt_does_alone(model):
    short, long = PROMPT[:, :4], torch.randint(3, 61, (1, 9), generator=torch.Generator().manual_seed(3))
    batch = torch.cat([torch.cat([torch.zeros(1, 5, dtype=torch.long), short], 1), long])
    mask = torch.ones_like(batch)
    mask[0, :5] = 0
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        together = model.generate(batch, attention_mask=mask, **kw)[:, 9:]
        alone = [model.generate(p, attention_mask=torch.ones_like(p), **kw)[:, p.shape[1]:] for p in (short, long)]
    assert torch.equal(together, torch.cat(alone))


def test_beam_search_scores_what_the_full_forward_scores(model):
    """With length_penalty 0 a beam's score is the sum of its tokens' log-probabilities: recomputed
    from one full forward, so the cache was reordered right across the beams."""
    with torch.no_grad():
        out = model.generate(PROMPT, num_beams=3, num_return_sequences=3, max_new_tokens=5, do_sample=False,
                             length_penalty=0.0, early_stopping=True, pad_token_id=0, return_dict_in_generate=True,
                             output_scores=True)
        assert isinstance(getattr(out, CACHE_NAME), DynamicCache)
        logp = model(out.sequences).logits.log_softmax(-1)
    new = out.sequences[:, 7:]
    want = logp[:, 6:-1].gather(-1, new[..., None]).squeeze(-1).sum(-1)
    torch.testing.assert_close(out.sequences_scores, want, atol=1e-4, rtol=1e-4)
    assert len({tuple(s.tolist()) for s in out.sequences}) == 3


def test_greedy_and_sampling_are_seeded_and_backends_agree(model):
    kw = dict(max_new_tokens=8, pad_token_id=0)
    with torch.no_grad():
        greedy = model.generate(PROMPT, do_sample=False, **kw)
        set_backend(model, "reference")
        assert torch.equal(model.generate(PROMPT, do_sample=False, **kw), greedy)
        set_backend(model, "sparse")
        sample = dict(do_sample=True, temperature=1.5, top_p=0.9, top_k=20, **kw)
        torch.manual_seed(7)
        a = model.generate(PROMPT, **sample)
        torch.manual_seed(7)
        b = model.generate(PROMPT, **sample)
        torch.manual_seed(8)
        c = model.generate(PROMPT, **sample)
    assert greedy.shape == (1, 15) and torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a[:, :7], PROMPT)
