"""The suite needs nothing outside the clone: reference facts live in tests/fixtures/ (small), real images in
quickstart/, and no test reads ../shared."""

import re

from tests.conftest import ROOT, SPEC


def test_no_test_reads_outside_the_repository():
    for path in sorted((ROOT / 'tests').glob('*.py')):
        text = path.read_text()
        assert not re.search(r"['\"/]shared['\"/]", text.replace('tests/fixtures', '')), f'{path.name} refers to shared/'


def test_reference_fixtures_are_present_and_small():
    files = [p for p in SPEC.rglob('*') if p.is_file()]
    names = {p.relative_to(SPEC).as_posix() for p in files}
    assert {'state_dicts.json.gz', 'rng_draws.txt', 'phema_files.txt', 'samplers/srg.edm.pt',
            'pickles/edm2-snapshot.pkl', 'networks/net.edm2.precond.l10.pt'} <= names
    assert sum(p.stat().st_size for p in files) < 5 << 20
