"""Rollouts: EOS masks, per-sample seeded sampling, sampling filters, padding-correct
log-probs, merged-LoRA generation."""

import pytest
import torch

from rlhf.models import LoraConfig, load_policy
from rlhf.ppo import PPOConfig
from rlhf.ppo.rollout import (
    decode_responses,
    filter_logits,
    generate,
    merged_lora,
    response_logprobs,
    response_mask,
    rollout_texts,
    sample_uniforms,
    tokenize_prompts,
)
from tests.rlhf.ppo.helpers import TINY


@pytest.fixture(scope="module")
def tiny():
    return load_policy(TINY)


def test_response_mask_stops_after_first_eos():
    responses = torch.tensor([[5, 6, 2, 7, 2], [5, 6, 7, 8, 9], [2, 0, 0, 0, 0]])
    mask = response_mask(responses, eos_ids=[2])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]


def test_filter_logits_top_k_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, 1.0, 2, 1.0)).tolist() == [[False, False, True, True]]
    # top_p = 0.7: 0.5 alone is below 0.7, 0.5 + 0.3 reaches it -> keep two
    assert torch.isinf(filter_logits(logits, 1.0, 0, 0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, 1.0, 0, 0.5)).tolist() == [[False, True, True, True]]
    torch.testing.assert_close(filter_logits(logits, 2.0, 0, 1.0), logits / 2)


def test_sample_uniforms_depend_on_sample_not_batch():
    a = sample_uniforms(0, 3, [5, 9], 4)
    b = sample_uniforms(0, 3, [9], 4)
    torch.testing.assert_close(a[1:], b)
    assert not torch.equal(a[0], a[1])
    assert not torch.equal(sample_uniforms(0, 4, [9], 4), b)


def test_generation_is_per_sample_and_respects_lengths(tiny):
    model, tok = tiny
    cfg = PPOConfig(max_new_tokens=6, min_new_tokens=6, top_k=50)
    prompts = ["Hi", "A much longer prompt than the first one"]
    ids, am = tokenize_prompts(tok, prompts, 64)
    both = generate(model, tok, ids, am, cfg, iteration=0, sample_indices=[10, 11])
    alone = generate(model, tok, ids[1:], am[1:], cfg, iteration=0, sample_indices=[11])
    assert both.responses.shape == (2, 6) and both.action_mask.sum().item() == 12
    # the same sample is drawn alone or next to a longer/shorter neighbour (other left padding)
    assert both.responses[1].tolist() == alone.responses[0].tolist()
    assert len(decode_responses(tok, both)) == 2


def test_logprobs_are_the_same_with_left_padding(tiny):
    model, tok = tiny
    cfg = PPOConfig(max_new_tokens=5)
    ids, am = tokenize_prompts(tok, ["Hi", "A much longer prompt than the first one"], 64)
    gen = generate(model, tok, ids, am, cfg, iteration=1, sample_indices=[0, 1])
    lp, ent = response_logprobs(model, gen.sequences, gen.attention_mask, 5, 1.0, with_entropy=True)
    # row 0 without its left padding
    real = gen.attention_mask[0].bool()
    lp0, _ = response_logprobs(model, gen.sequences[:1, real], gen.attention_mask[:1, real], 5, 1.0)
    m = gen.action_mask[0].bool()
    torch.testing.assert_close(lp[0][m], lp0[0][m], atol=1e-5, rtol=0)
    assert ent.shape == (2, 5) and (lp <= 0).all()


def test_merged_lora_generation_restores_weights_exactly():
    model, tok = load_policy(TINY, LoraConfig(enabled=True, rank=4, alpha=8.0))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.5)  # make the adapters matter
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids, am = tokenize_prompts(tok, ["Hello there"], 64)
    with torch.no_grad():
        unmerged = model(input_ids=ids, attention_mask=am).logits
        with merged_lora(model):
            merged = model(input_ids=ids, attention_mask=am).logits
    torch.testing.assert_close(merged, unmerged, atol=1e-4, rtol=1e-4)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=am).logits, unmerged)


def test_grouped_prompt_forward_equals_plain_forward(tiny):
    model, tok = tiny
    cfg = PPOConfig(max_new_tokens=5, top_k=50)
    G = 3
    prompts = [p for p in ["Hi", "A much longer prompt than the first one"] for _ in range(G)]
    ids, am = tokenize_prompts(tok, prompts, 64)
    gen = generate(model, tok, ids, am, cfg, iteration=0, sample_indices=list(range(2 * G)))
    plain, _ = response_logprobs(model, gen.sequences, gen.attention_mask, 5, 0.7)
    model.train()
    grouped, _ = response_logprobs(model, gen.sequences, gen.attention_mask, 5, 0.7, group_size=G)
    torch.testing.assert_close(grouped, plain, atol=1e-5, rtol=0)
    # gradients flow through the shared prompt's cache
    (grouped * gen.action_mask).sum().backward()
    emb = model.get_input_embeddings().weight
    assert emb.grad is not None and emb.grad[ids[0, -1]].abs().sum() > 0
    model.zero_grad()
    model.eval()


def test_shared_prefill_generates_the_same_samples(tiny):
    model, tok = tiny
    cfg = PPOConfig(max_new_tokens=6, top_k=50)
    G = 2
    prompts = [p for p in ["Hi", "A much longer prompt than the first one"] for _ in range(G)]
    ids, am = tokenize_prompts(tok, prompts, 64)
    plain = generate(model, tok, ids, am, cfg, iteration=2, sample_indices=[0, 1, 2, 3])
    shared = generate(model, tok, ids, am, cfg, iteration=2, sample_indices=[0, 1, 2, 3], group_size=G)
    assert shared.sequences.tolist() == plain.sequences.tolist()
    assert shared.action_mask.tolist() == plain.action_mask.tolist()


def test_grouped_hidden_states_equal_plain(tiny):
    from rlhf.ppo.rollout import response_logits

    model, tok = tiny
    G = 2
    prompts = [p for p in ["Hi", "A much longer prompt than the first one"] for _ in range(G)]
    ids, am = tokenize_prompts(tok, prompts, 64)
    gen = generate(model, tok, ids, am, PPOConfig(max_new_tokens=4), iteration=0, sample_indices=[0, 1, 2, 3])
    with torch.no_grad():
        lp, hp = response_logits(model, gen.sequences, gen.attention_mask, 4, 1, with_hidden=True)
        lg, hg = response_logits(model, gen.sequences, gen.attention_mask, 4, G, with_hidden=True)
    m = gen.action_mask.bool()
    torch.testing.assert_close(hg[m], hp[m], atol=1e-5, rtol=0)
    torch.testing.assert_close(lg[m], lp[m], atol=1e-5, rtol=0)


def test_rollout_prompts_are_user_turns_of_the_chat_template(tiny):
    _, tok = tiny
    [text] = rollout_texts(tok, ["Tell me a joke."], chat_template=True)
    assert text == tok.apply_chat_template([{"role": "user", "content": "Tell me a joke."}], tokenize=False, add_generation_prompt=True)
    assert text != "Tell me a joke." and text.index("Tell me a joke.") > 0
    assert rollout_texts(tok, ["Tell me a joke."], chat_template=False) == ["Tell me a joke."]
