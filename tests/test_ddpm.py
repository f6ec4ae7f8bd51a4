"""DDPM / DDIM math (training/ddpm.py) against the reference facts of tqch/ddpm-torch in tests/fixtures/ddpm,
plus the learned-variance / hybrid objective (Nichol & Dhariwal 2021) that no reference implements."""

import math
import re
from pathlib import Path

import pytest
import torch

from training import ddpm

FIXTURES = Path(__file__).parent / 'fixtures' / 'ddpm'
MEAN_VAR = [(m, v) for m in ddpm.MODEL_MEAN_TYPES for v in ('fixed-small', 'fixed-large')]


def load(name):
    return torch.load(FIXTURES / name, weights_only=False)


def close(actual, expected, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def fixed_model(out):
    return lambda x, t: out

#----------------------------------------------------------------------------
# Schedules, tables, DDIM subsequences.


def parse_sections(name):
    sections, current = {}, None
    for line in (FIXTURES / name).read_text().splitlines():
        if m := re.match(r'\[(\w+)(?: size=(\d+))?\]\s*(.*)', line):
            current = sections.setdefault((m.group(1), m.group(2)), dict(header=m.group(3), lines=[]))
        elif current is not None and line.startswith('  '):
            current['lines'].append(line.strip())
    return sections


@pytest.mark.parametrize('schedule', ddpm.BETA_SCHEDULES + ('const',))
def test_beta_schedules_match_the_reference(schedule):
    section = parse_sections('beta_schedules.txt')[(schedule, None)]
    betas = ddpm.get_beta_schedule(schedule, 1e-4, 0.02, 1000)
    assert betas.dtype == torch.float64 and betas.shape == (1000,)
    for line in section['lines']:
        index, value = re.fullmatch(r'beta\[\s*(\d+)\] = (\S+)', line).groups()
        assert betas[int(index)].item() == pytest.approx(float(value), rel=4e-16, abs=0)
    header = dict(re.findall(r'(\w+)=(\S+)', section['header']))
    assert betas.sum().item() == pytest.approx(float(header['sum']), rel=1e-14)
    assert len(torch.unique(betas)) == int(header['n_distinct'])


def test_unknown_schedule_is_a_clear_error():
    with pytest.raises(ValueError, match=r'--beta-schedule=cosine .*quad, linear, warmup10, warmup50, jsd'):
        ddpm.get_beta_schedule('cosine', 1e-4, 0.02, 1000)


def test_derived_tables_match_the_reference():
    diffusion = {v: ddpm.GaussianDiffusion(ddpm.get_beta_schedule('linear', 1e-4, 0.02, 1000), 'eps', v, 'mse')
                 for v in ('fixed-small', 'fixed-large')}
    lines = (FIXTURES / 'diffusion_buffers.txt').read_text().split('Definitions')[0].splitlines()
    index = [0, 1, 2, 10, 100, 500, 998, 999]
    checked = 0
    for line in lines:
        fields = line.split()
        if len(fields) < 9 or line.startswith('#'):
            continue
        name, values = fields[:-8], [float(v) for v in fields[-8:]]
        if name[0] in ('fixed_model_var', 'fixed_model_logvar'):
            d = diffusion[name[1]]
            table = d.tables[d.fixed_var_tables()[0 if name[0] == 'fixed_model_var' else 1]]
        else:
            table = diffusion['fixed-small'].tables[name[0]]
        close(table[index], torch.tensor(values, dtype=torch.float64), rtol=1e-13, atol=1e-300)
        checked += 1
    assert checked == 14


@pytest.mark.parametrize('schedule', ddpm.SKIP_SCHEDULES)
def test_ddim_subsequences_match_the_reference_quirks(schedule):
    for (name, size), section in parse_sections('ddim_timesteps.txt').items():
        if name != schedule:
            continue
        expected = [int(v) for v in ' '.join(section['lines']).split()]
        assert ddpm.get_selection_schedule(schedule, int(size), 1000).tolist() == expected
    assert len(ddpm.get_selection_schedule('linear', 33, 1000)) == 34


def test_subseq_size_larger_than_timesteps_is_a_clear_error():
    with pytest.raises(ValueError, match=r'--subseq-size=1001 must lie in \[1, --timesteps=1000\]'):
        ddpm.get_selection_schedule('linear', 1001, 1000)

#----------------------------------------------------------------------------
# q, posterior, p_mean_var, one ancestral step and the losses on the reference's fixed inputs.


@pytest.fixture(scope='module')
def ref():
    return load('diffusion_linear1000.pt')['tensors']


def test_q_and_posterior_match_the_reference(ref):
    d = ddpm.GaussianDiffusion(ref['betas'], 'eps', 'fixed-small', 'mse')
    q = ref['q']
    for actual, expected in zip(d.q_mean_var(q['x_0'], q['t']), (q['q_mean'], q['q_var'], q['q_logvar'])):
        close(actual, expected)
    x_t = d.q_sample(q['x_0'], q['t'], q['noise'])
    close(x_t, q['x_t'])
    post = d.q_posterior_mean_var(q['x_0'], x_t, q['t'])
    for actual, expected in zip(post, (q['post_mean'], q['post_var'], q['post_logvar'])):
        close(actual, expected)


@pytest.mark.parametrize('mean_type,var_type', MEAN_VAR)
def test_model_distribution_and_ancestral_step_match_the_reference(ref, mean_type, var_type):
    d = ddpm.GaussianDiffusion(ref['betas'], mean_type, var_type, 'mse')
    expected = ref['pstep'][f'{mean_type}/{var_type}']
    x_t = ref['q']['x_t']
    outputs = d.p_mean_var(fixed_model(ref['model_fixed']), x_t, ref['t'], clip_denoised=True)
    for actual, key in zip(outputs, ('mean', 'var', 'logvar', 'pred_x_0')):
        close(actual, expected[key])
    g = torch.Generator().manual_seed(400)
    sample = d.p_sample_step(fixed_model(ref['model_fixed']), x_t, ref['t'],
                             randn_like=lambda x: torch.empty_like(x).normal_(generator=g))
    close(sample, expected['sample'])
    assert torch.equal(torch.empty_like(x_t).normal_(generator=torch.Generator().manual_seed(400)), ref['pstep_noise'])


@pytest.mark.parametrize('mean_type,var_type', MEAN_VAR)
@pytest.mark.parametrize('loss_type', ddpm.LOSS_TYPES)
def test_losses_match_the_reference(ref, mean_type, var_type, loss_type):
    d = ddpm.GaussianDiffusion(ref['betas'], mean_type, var_type, loss_type)
    loss = d.train_losses(fixed_model(ref['model_fixed']), ref['x_0'], ref['t'], ref['noise'])
    close(loss, ref['losses'][f'{mean_type}/{var_type}/{loss_type}'], rtol=1e-4, atol=1e-6)
    assert loss.shape == (6,)


@pytest.mark.parametrize('eta', ['eta0', 'eta1'])
def test_one_ddim_step_matches_the_reference(eta):
    case = load('ddim_step.pt')['tensors'][eta]
    betas = ddpm.get_beta_schedule('linear', 1e-4, 0.02, 1000)
    assert torch.equal(ddpm.get_selection_schedule('linear', 10, 1000), case['subsequence'])
    d = ddpm.DDIM(betas, case['subsequence'], eta=float(eta[-1]), model_mean_type='eps', model_var_type='fixed-small')
    outputs = d.p_mean_var(fixed_model(case['model_fixed']), case['x_t'], case['t'], clip_denoised=True)
    for actual, key in zip(outputs, ('mean', 'var', 'logvar', 'pred_x_0')):
        close(actual, case[key])
    g = torch.Generator().manual_seed(case['seed'])
    sample = d.p_sample_step(fixed_model(case['model_fixed']), case['x_t'], case['t'],
                             randn_like=lambda x: torch.empty_like(x).normal_(generator=g))
    close(sample, case['sample'])
    if eta == 'eta0':  # eta = 0 still adds 1e-10 * noise, as the reference does.
        assert case['logvar'].flatten()[0].item() == pytest.approx(math.log(1e-20), rel=1e-6)


def test_ddim_calls_the_network_with_original_timesteps():
    betas = ddpm.get_beta_schedule('linear', 1e-4, 0.02, 1000)
    d = ddpm.DDIM(betas, ddpm.get_selection_schedule('quadratic', 10, 1000), eta=0.0)
    seen = []
    def net(x, t):
        seen.append(t[0].item())
        return torch.zeros_like(x)
    d.p_sample(net, torch.randn(2, 3, 4, 4))
    assert seen == [800, 632, 484, 356, 247, 158, 89, 40, 10, 0]


def test_ddim_with_eta_not_one_uses_the_scaled_posterior_variance():
    betas = ddpm.get_beta_schedule('linear', 1e-4, 0.02, 1000)
    sub = ddpm.get_selection_schedule('linear', 10, 1000)
    assert ddpm.DDIM(betas, sub, eta=0.5, model_var_type='fixed-large').model_var_type == 'fixed-small'
    assert ddpm.DDIM(betas, sub, eta=1.0, model_var_type='fixed-large').model_var_type == 'fixed-large'

#----------------------------------------------------------------------------
# Learned variance (Nichol & Dhariwal 2021): no reference row, so check it against the fixed rows it spans.


def learned_output(ref, v):
    return torch.cat([ref['model_fixed'], torch.full_like(ref['model_fixed'], v)], dim=1)


@pytest.mark.parametrize('mean_type', ddpm.MODEL_MEAN_TYPES)
def test_learned_variance_interpolates_between_posterior_and_beta(ref, mean_type):
    d = ddpm.GaussianDiffusion(ref['betas'], mean_type, 'learned', 'kl')
    x_t, t = ref['q']['x_t'], ref['t']
    small = ref['pstep'][f'{mean_type}/fixed-small']
    mean, var, logvar, _ = d.p_mean_var(fixed_model(learned_output(ref, -1.0)), x_t, t)
    close(mean, small['mean'])
    close(logvar, small['logvar'].expand_as(logvar))
    _, _, logvar_hi, _ = d.p_mean_var(fixed_model(learned_output(ref, 1.0)), x_t, t)
    close(logvar_hi, ref['betas'].float()[t].log().reshape(-1, 1, 1, 1).expand_as(logvar))
    _, _, logvar_mid, _ = d.p_mean_var(fixed_model(learned_output(ref, 0.0)), x_t, t)
    close(logvar_mid, (logvar + logvar_hi) / 2)
    # The kl loss with v = -1 is the fixed-small kl row of the reference.
    loss = d.train_losses(fixed_model(learned_output(ref, -1.0)), ref['x_0'], t, ref['noise'])
    close(loss, ref['losses'][f'{mean_type}/fixed-small/kl'], rtol=1e-4, atol=1e-6)


def test_hybrid_loss_is_mse_plus_weighted_vlb_with_stop_gradient_on_the_mean(ref):
    d = ddpm.GaussianDiffusion(ref['betas'], 'eps', 'learned', 'mse')
    out = learned_output(ref, -1.0).requires_grad_(True)
    loss = d.train_losses(fixed_model(out), ref['x_0'], ref['t'], ref['noise'])
    expected = ref['losses']['eps/fixed-small/mse'] + 1e-3 * 1000 * ref['losses']['eps/fixed-small/kl']
    close(loss, expected, rtol=1e-4, atol=1e-6)
    loss.sum().backward()
    mean_grad, var_grad = out.grad.chunk(2, dim=1)
    mse_grad = 2 * (ref['model_fixed'] - ref['noise']) / ref['noise'][0].numel()
    close(mean_grad, mse_grad)            # L_vlb adds nothing to the mean's gradient.
    assert var_grad[ref['t'] > 0].abs().sum() > 0     # ... but trains the variance.


def test_learned_variance_needs_twice_the_channels(ref):
    d = ddpm.GaussianDiffusion(ref['betas'], 'eps', 'learned', 'mse')
    with pytest.raises(Exception):
        d.train_losses(fixed_model(ref['model_fixed'][:, :1]), ref['x_0'], ref['t'], ref['noise'])


@pytest.mark.parametrize('flag,kwargs', [('--model-mean-type', dict(model_mean_type='v')),
                                         ('--model-var-type', dict(model_var_type='fixed')),
                                         ('--loss-type', dict(loss_type='l1'))])
def test_bad_choices_name_the_flag(ref, flag, kwargs):
    with pytest.raises(ValueError, match=f'{flag}='):
        ddpm.GaussianDiffusion(ref['betas'], **kwargs)
