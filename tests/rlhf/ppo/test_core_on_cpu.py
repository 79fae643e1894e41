"""The PPO-family math against values computed by hand (see the comments for each)."""

import math

import pytest
import torch

from rlhf.ppo import core
from rlhf.ppo.config import DeepSpeedConfig, PPOConfig, deepspeed_config_dict
from rlhf.ppo.experience import Experience

F = torch.float32


def t(x):
    return torch.tensor(x, dtype=F)


def test_masked_mean_var_whiten_ignore_padding():
    x = t([[1.0, 2.0, 3.0, 100.0]])
    m = t([[1, 1, 1, 0]])
    assert core.masked_mean(x, m).item() == pytest.approx(2.0)
    assert core.masked_var(x, m).item() == pytest.approx(1.0)  # unbiased: (1 + 0 + 1) / 2
    assert core.masked_var(x, m, unbiased=False).item() == pytest.approx(2 / 3)
    w = core.masked_whiten(x, m)
    torch.testing.assert_close(w, t([[-1.0, 0.0, 1.0, 0.0]]), atol=1e-6, rtol=0)
    w2 = core.masked_whiten(x, m, shift_mean=False)
    torch.testing.assert_close(w2, t([[1.0, 2.0, 3.0, 0.0]]), atol=1e-6, rtol=0)


def test_whiten_with_all_reduce_equals_whole_batch():
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))
    m = (torch.rand(6, 5, generator=torch.Generator().manual_seed(1)) > 0.3).float()
    whole = core.masked_whiten(x, m)
    # two "ranks" holding rows 0-2 and 3-5: the all-reduce adds the other half's moments
    halves = [(x[:3], m[:3]), (x[3:], m[3:])]

    def stats(xx, mm):
        return torch.stack([mm.sum(), (xx * mm).sum(), (xx * xx * mm).sum()])

    total = stats(*halves[0]) + stats(*halves[1])
    parts = [core.masked_whiten(xx, mm, all_reduce=lambda s: total) for xx, mm in halves]
    torch.testing.assert_close(torch.cat(parts), whole, atol=1e-6, rtol=0)


def test_gae_by_hand():
    # row 0: 3 tokens then padding; gamma=0.9, lam=0.8 (gamma*lam = 0.72)
    #   t=2: delta = 2 + 0      - 1.5 = 0.5                 A2 = 0.5
    #   t=1: delta = 0 + 0.9*1.5 - 1.0 = 0.35               A1 = 0.35 + 0.72*0.5  = 0.71
    #   t=0: delta = 1 + 0.9*1.0 - 0.5 = 1.4                A0 = 1.4  + 0.72*0.71 = 1.9112
    # row 1: one token (EOS at once): A0 = 3 - 1 = 2
    rewards = t([[1.0, 0.0, 2.0, 7.0], [3.0, 5.0, 5.0, 5.0]])
    values = t([[0.5, 1.0, 1.5, 9.0], [1.0, 9.0, 9.0, 9.0]])
    mask = t([[1, 1, 1, 0], [1, 0, 0, 0]])
    adv, ret = core.compute_gae(rewards, values, mask, gamma=0.9, lam=0.8)
    torch.testing.assert_close(adv, t([[1.9112, 0.71, 0.5, 0.0], [2.0, 0, 0, 0]]), atol=1e-5, rtol=0)
    torch.testing.assert_close(ret, t([[2.4112, 1.71, 2.0, 0.0], [3.0, 0, 0, 0]]), atol=1e-5, rtol=0)


def test_gae_lambda_one_gamma_one_is_return_minus_value():
    rewards = t([[0.0, 0.0, 1.0]])
    values = t([[0.2, 0.4, 0.6]])
    mask = t([[1, 1, 1]])
    adv, ret = core.compute_gae(rewards, values, mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(ret, t([[1.0, 1.0, 1.0]]))
    torch.testing.assert_close(adv, t([[0.8, 0.6, 0.4]]))


def test_kl_estimators_by_hand():
    logp, ref = t([-1.0, -2.0]), t([-2.0, -2.0])
    torch.testing.assert_close(core.kl_penalty(logp, ref, "k1"), t([1.0, 0.0]))
    # k3 with log_ratio = 1: exp(-1) - 1 + 1 = 0.36788
    torch.testing.assert_close(core.kl_penalty(logp, ref, "k3"), t([math.exp(-1), 0.0]))
    with pytest.raises(ValueError):
        core.kl_penalty(logp, ref, "k9")


def test_token_rewards_put_score_on_last_real_token():
    scores = t([1.0, 2.0])
    kl = t([[0.1, 0.2, 0.3], [0.5, 0.5, 0.5]])
    mask = t([[1, 1, 0], [1, 1, 1]])
    r = core.token_rewards(scores, kl, mask, kl_coef=0.5)
    torch.testing.assert_close(r, t([[-0.05, 0.9, 0.0], [-0.25, -0.25, 1.75]]))


def test_group_normalized_and_rloo_by_hand():
    scores = t([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    g = core.group_normalized_advantages(scores, 3)
    # group 0: mean 2, unbiased std 1; group 1: std 0 -> all 0
    torch.testing.assert_close(g, t([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]), atol=1e-5, rtol=0)
    r = core.rloo_advantages(scores, 3)
    # baselines: (2+3)/2, (1+3)/2, (1+2)/2
    torch.testing.assert_close(r, t([-1.5, 0.0, 1.5, 0.0, 0.0, 0.0]))


def test_estimators_registered_by_name_and_masked():
    assert {"gae", "grpo", "rloo"} <= set(core.advantage_estimators())
    mask = t([[1, 1, 0], [1, 0, 0]])
    rewards = t([[0.0, 1.0, 0.0], [3.0, 0.0, 0.0]])
    inp = core.AdvantageInputs(rewards=rewards, values=None, mask=mask, group_size=2, gamma=1.0, lam=1.0)
    adv, ret = core.get_advantage_estimator("rloo")(inp)
    torch.testing.assert_close(adv, t([[-2.0, -2.0, 0.0], [2.0, 0.0, 0.0]]))
    torch.testing.assert_close(ret, t([[1.0, 1.0, 0.0], [3.0, 0.0, 0.0]]))
    adv, _ = core.get_advantage_estimator("grpo")(inp)
    s = 1 / math.sqrt(2)  # (1 - 2) / std([1, 3]) = -1 / 1.41421
    torch.testing.assert_close(adv, t([[-s, -s, 0.0], [s, 0.0, 0.0]]), atol=1e-5, rtol=0)
    with pytest.raises(ValueError):
        core.get_advantage_estimator("gae")(inp)
    with pytest.raises(KeyError):
        core.get_advantage_estimator("nope")
    with pytest.raises(ValueError):
        core.register_advantage_estimator("gae")(lambda i: (i.rewards, i.rewards))


def test_policy_loss_by_hand():
    # ratios 1.5, 0.5, 1.1 (and a padded token with a wild ratio), eps = 0.2
    #   A= 1, r=1.5: max(-1.5, -1.2) = -1.2  (clipped)
    #   A=-1, r=0.5: max( 0.5,  0.8) =  0.8  (clipped)
    #   A= 2, r=1.1: max(-2.2, -2.2) = -2.2
    old = t([[0.0, 0.0, 0.0, 0.0]])
    logp = t([[math.log(1.5), math.log(0.5), math.log(1.1), 5.0]])
    adv = t([[1.0, -1.0, 2.0, 10.0]])
    mask = t([[1, 1, 1, 0]])
    out = core.policy_loss(logp, old, adv, mask, clip_range=0.2)
    assert out.loss.item() == pytest.approx(-2.6 / 3, abs=1e-6)
    assert out.clip_frac.item() == pytest.approx(2 / 3)
    k3 = [r - 1 - math.log(r) for r in (1.5, 0.5, 1.1)]
    assert out.approx_kl.item() == pytest.approx(sum(k3) / 3, abs=1e-6)
    # an explicit normaliser (global token count) divides the sum
    out2 = core.policy_loss(logp, old, adv, mask, clip_range=0.2, normalizer=6.0)
    assert out2.loss.item() == pytest.approx(-2.6 / 6, abs=1e-6)


def test_policy_loss_gradient_is_zero_where_clipped():
    logp = torch.tensor([[math.log(1.5), math.log(1.1)]], requires_grad=True)
    out = core.policy_loss(logp, t([[0.0, 0.0]]), t([[1.0, 1.0]]), t([[1, 1]]), clip_range=0.2)
    out.loss.backward()
    assert logp.grad[0, 0].item() == 0.0
    assert logp.grad[0, 1].item() == pytest.approx(-1.1 / 2)


def test_value_loss_by_hand():
    # token 0: (1-2)^2 = 1, clipped value 0.5+0.2 = 0.7 -> (0.7-2)^2 = 1.69 -> 0.845
    # token 1: (2-0)^2 = 4, unchanged by the clip -> 2.0
    values, old, ret = t([[1.0, 2.0, 50.0]]), t([[0.5, 2.0, 0.0]]), t([[2.0, 0.0, 0.0]])
    mask = t([[1, 1, 0]])
    out = core.value_loss(values, old, ret, mask, clip_range=0.2)
    assert out.loss.item() == pytest.approx((0.845 + 2.0) / 2)
    assert out.clip_frac.item() == pytest.approx(0.5)
    out = core.value_loss(values, old, ret, mask, clip_range=None)
    assert out.loss.item() == pytest.approx((0.5 + 2.0) / 2)


def test_entropy_logprobs_explained_variance():
    logits = torch.zeros(1, 2, 4)
    torch.testing.assert_close(core.entropy_from_logits(logits), t([[math.log(4)] * 2]))
    logits = t([[[0.0, math.log(3.0)]]])
    lp = core.logprobs_from_logits(logits, torch.tensor([[1]]))
    assert lp.item() == pytest.approx(math.log(0.75))
    lp_t = core.logprobs_from_logits(logits, torch.tensor([[1]]), temperature=2.0)
    assert lp_t.item() == pytest.approx(math.log(math.sqrt(3) / (1 + math.sqrt(3))))
    ret = t([[1.0, 2.0, 3.0, 99.0]])
    mask = t([[1, 1, 1, 0]])
    assert core.explained_variance(ret, ret, mask).item() == pytest.approx(1.0)
    assert core.explained_variance(torch.full_like(ret, 2.0), ret, mask).item() == pytest.approx(0.0, abs=1e-6)


def test_logprobs_and_entropy_in_one_pass_match_the_separate_ones():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(2, 3, 11, generator=g) * 3
    labels = torch.randint(0, 11, (2, 3), generator=g)
    weights = torch.randn(2, 3, generator=g)
    for temperature in (1.0, 0.7):
        for entropy_grad in (False, True):
            a, b = base.clone().requires_grad_(), base.clone().requires_grad_()
            lp, ent = core.logprobs_and_entropy(a, labels, temperature, entropy_grad)
            lp_ref = core.logprobs_from_logits(b, labels, temperature)
            ent_ref = core.entropy_from_logits(b, temperature)
            torch.testing.assert_close(lp, lp_ref)
            torch.testing.assert_close(ent, ent_ref)
            assert ent.requires_grad is entropy_grad
            loss = (lp * weights).sum() + (ent.sum() if entropy_grad else 0.0)
            loss_ref = (lp_ref * weights).sum() + (ent_ref.sum() if entropy_grad else 0.0)
            loss.backward()
            loss_ref.backward()
            torch.testing.assert_close(a.grad, b.grad)


def test_entropy_of_a_wide_spread_vocabulary_and_of_masked_tokens():
    """Most tokens far below exp(-87) (where exp gives denormals and the entropy floors them)
    and tokens at -inf: the entropy is the float64 one, gradients included, and finite."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 5000, generator=g, dtype=torch.float64) * 40
    logits[0, 0, :2500] = float("-inf")
    logp64 = torch.log_softmax(logits, -1)
    exact = -(logp64.exp() * torch.where(logp64.isinf(), 0.0, logp64)).sum(-1)
    assert (logp64 < core.LOGP_FLOOR).float().mean() > 0.5
    x = logits.float().requires_grad_()
    ent = core.entropy_from_logits(x)
    assert torch.isfinite(ent).all()
    torch.testing.assert_close(ent.double(), exact, atol=1e-5, rtol=1e-5)
    ent.sum().backward()
    assert torch.isfinite(x.grad).all()
    y = logits.clone().requires_grad_()
    exact_y = -(torch.softmax(y, -1) * torch.log_softmax(y, -1).clamp(min=-1e30)).sum(-1)
    exact_y.sum().backward()
    torch.testing.assert_close(x.grad.double(), y.grad, atol=1e-5, rtol=1e-4)


def test_kl_controllers():
    fixed = core.make_kl_controller("fixed", 0.1, 6.0, 100)
    fixed.update(100.0, 10)
    assert fixed.value == 0.1
    ada = core.make_kl_controller("adaptive", 0.1, 6.0, 100)
    ada.update(12.0, 10)  # error clipped to +0.2: 0.1 * (1 + 0.2 * 10 / 100)
    assert ada.value == pytest.approx(0.102)
    ada.update(3.0, 10)  # error -0.5 clipped to -0.2
    assert ada.value == pytest.approx(0.102 * 0.98)
    restored = core.make_kl_controller("adaptive", 1.0, 1.0, 1)
    restored.load_state_dict(ada.state_dict())
    assert restored.value == ada.value and restored.target == 6.0 and restored.horizon == 100


def test_experience_batch_ops():
    B, P, T = 4, 3, 2
    g = torch.Generator().manual_seed(0)

    def r(*s):
        return torch.randn(*s, generator=g)

    exp = Experience(
        sequences=torch.arange(B * (P + T)).view(B, P + T),
        attention_mask=torch.ones(B, P + T, dtype=torch.long),
        action_mask=torch.ones(B, T),
        old_logprobs=r(B, T),
        ref_logprobs=r(B, T),
        scores=r(B),
        rewards=r(B, T),
        advantages=r(B, T),
        returns=r(B, T),
    )
    assert len(exp) == 4 and exp.prompt_length == 3 and exp.response_length == 2
    parts = exp.split(3)
    assert [len(p) for p in parts] == [3, 1]
    back = Experience.concat(parts)
    torch.testing.assert_close(back.advantages, exp.advantages)
    assert back.values is None
    sel = exp.select([2, 0])
    torch.testing.assert_close(sel.scores, exp.scores[[2, 0]])
    assert exp.to("cpu").sequences.device.type == "cpu"
    # different response lengths are padded on concat (response on the right, prompt on the left)
    short = Experience(**{**vars(exp.select([0])), "action_mask": torch.ones(1, 1), "old_logprobs": r(1, 1),
                          "ref_logprobs": r(1, 1), "rewards": r(1, 1), "advantages": r(1, 1), "returns": r(1, 1),
                          "sequences": exp.sequences[:1, :4], "attention_mask": exp.attention_mask[:1, :4]})
    both = Experience.concat([exp, short])
    assert both.action_mask[-1].tolist() == [1.0, 0.0]
    assert both.sequences[-1].tolist() == exp.sequences[0, :4].tolist() + [0]
    with pytest.raises(ValueError):
        Experience(**{**vars(exp), "rewards": r(B, T + 1)})


def test_configs_validate():
    with pytest.raises(ValueError, match="group_size"):
        PPOConfig(advantage_estimator="grpo", group_size=1)
    with pytest.raises(ValueError, match="extra"):
        PPOConfig(gamma_typo=1.0)
    with pytest.raises(ValueError):
        PPOConfig(clip_range=0.0)
    with pytest.raises(ValueError, match="minibatch_size"):
        PPOConfig(rollout_batch_size=3, minibatch_size=2)
    with pytest.raises(ValueError):
        DeepSpeedConfig(zero_stage=4)
    with pytest.raises(ValueError, match="offload_param"):
        DeepSpeedConfig(zero_stage=2, offload_param="cpu")
    ds = DeepSpeedConfig(zero_stage=3, gradient_accumulation_steps=2)
    assert ds.use_bf16("cpu") is False and ds.use_bf16("cuda") is True
    d = deepspeed_config_dict(ds, micro_batch_size=2, world_size=2, max_grad_norm=0.5, device_type="cpu")
    assert d["train_batch_size"] == 8 and d["zero_optimization"]["stage"] == 3
    assert d["gradient_clipping"] == 0.5 and d["bf16"]["enabled"] is False
