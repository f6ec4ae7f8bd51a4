"""CPU thread choice (torch_utils/threads.py): OMP_NUM_THREADS wins, else idle usable cores, at least one."""

import os

import pytest
import torch

from torch_utils import threads


@pytest.fixture
def two_cores(monkeypatch):
    monkeypatch.setattr(threads, 'usable_cores', lambda: 2)


def test_user_setting_wins(two_cores):
    count, why = threads.choose_cpu_threads({'OMP_NUM_THREADS': '3'}, busy=0.0)
    assert count == torch.get_num_threads() and why == 'OMP_NUM_THREADS=3'


@pytest.mark.parametrize('busy,expected', [(0.0, 2), (0.2, 2), (0.5, 1), (0.9, 1), (1.0, 1)])
def test_idle_cores_only(two_cores, busy, expected):
    count, why = threads.choose_cpu_threads({}, busy=busy)
    assert count == expected and 'OMP_NUM_THREADS' in why


def test_local_ranks_share_the_cores(monkeypatch):
    monkeypatch.setattr(threads, 'usable_cores', lambda: 8)
    assert threads.choose_cpu_threads({'LOCAL_WORLD_SIZE': '2'}, busy=0.0)[0] == 4
    assert threads.choose_cpu_threads({'LOCAL_WORLD_SIZE': '16'}, busy=0.0)[0] == 1


def test_usable_cores_follow_affinity_and_physical_cores(monkeypatch):
    monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(threads.psutil, 'cpu_count', lambda logical=True: 16 if logical else 8)  # 2 threads per core
    assert threads.usable_cores() == 2
    monkeypatch.setattr(threads.psutil, 'cpu_count', lambda logical=True: 8)
    assert threads.usable_cores() == 4


def test_applied_once_and_only_on_cpu(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setattr(threads, '_applied', False)
    monkeypatch.setattr(threads, 'choose_cpu_threads', lambda: (1, 'test'))
    try:
        assert threads.apply_cpu_threads(torch.device('meta')) is None
        assert threads.apply_cpu_threads(torch.device('cpu')) == 'CPU threads: 1 (test)'
        assert torch.get_num_threads() == 1
        assert threads.apply_cpu_threads(torch.device('cpu')) is None
    finally:
        torch.set_num_threads(before)
