"""Unit tests of the archive pieces that need no server: addresses, credentials, the query split, the
state file, the push bookkeeping and the fetcher's bound on disk (with stand-in clients; the real Orthanc
is in test_archive_orthanc.py)."""

from __future__ import annotations

import json
import time

import pydicom
import pytest
import requests

from pipeline.archive.credentials import ENV_PASSWORD, ENV_TOKEN, ENV_USER, Credentials, load_credentials
from pipeline.archive.fetch import SeriesFetcher, describe_retrieve_error
from pipeline.archive.push import push_case
from pipeline.archive.query import RemoteSeries, parse_query
from pipeline.archive.state import ArchiveState, series_key
from pipeline.archive.url import is_archive_url, parse_archive_url
from pipeline.config import load_config
from pipeline.errors import InputError
from pipeline.io.dicom_write import write_dicom_series
from tests.conftest import make_affine
from tests.helpers import ct_case

# --- url ------------------------------------------------------------------------------------------


def test_archive_urls():
    assert is_archive_url("dicomweb+http://pacs:8042/dicom-web") and is_archive_url("DICOMWEB+HTTPS://x/y")
    assert not is_archive_url("/data/in") and not is_archive_url("http://pacs/dicom-web")
    url = parse_archive_url("dicomweb+https://pacs.example.org:443/dicom-web/")
    assert (url.base, url.https) == ("https://pacs.example.org:443/dicom-web", True)
    assert parse_archive_url("dicomweb+http://127.0.0.1:8042/dicom-web").base == "http://127.0.0.1:8042/dicom-web"


@pytest.mark.parametrize("text, message", [
    ("dicomweb+http://alice:secret@pacs/dicom-web", "never go on the command line"),
    ("dicomweb+http:///dicom-web", "names no host"),
    ("dicomweb+http://pacs/dicom-web?Modality=CT", "--query"),
    ("dicomweb+http://pacs:99999/dicom-web", "invalid port"),
])
def test_bad_archive_urls_are_refused(text, message):
    with pytest.raises(InputError, match=message) as info:
        parse_archive_url(text)
    assert "secret" not in str(info.value)


# --- credentials --------------------------------------------------------------------------------


def test_credentials_from_the_environment():
    assert load_credentials(environ={}).kind == "none"
    token = load_credentials(environ={ENV_TOKEN: "tok-123", ENV_USER: "u", ENV_PASSWORD: "p"})
    assert (token.kind, token.secret) == ("bearer", "tok-123")  # a token wins
    basic = load_credentials(environ={ENV_USER: "alice", ENV_PASSWORD: "pw-1"})
    assert (basic.kind, basic.user, basic.secret) == ("basic", "alice", "pw-1")
    assert "pw-1" not in repr(basic) and "pw-1" not in str(basic)
    with pytest.raises(InputError, match=ENV_PASSWORD):
        load_credentials(environ={ENV_USER: "alice"})


@pytest.mark.parametrize("text, kind, user, secret", [
    ("alice:pw:with:colons\n", "basic", "alice", "pw:with:colons"),
    ("bearer abc.def\n", "bearer", "", "abc.def"),
    ('{"user": "bob", "password": "x1"}', "basic", "bob", "x1"),
    ('{"token": "t0"}', "bearer", "", "t0"),
])
def test_credentials_file_formats(tmp_path, text, kind, user, secret):
    path = tmp_path / "creds"
    path.write_text(text)
    path.chmod(0o600)
    found = load_credentials(path)
    assert (found.kind, found.user, found.secret) == (kind, user, secret)
    assert secret not in repr(found)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_credentials_file_readable_by_others_is_refused(tmp_path, mode):
    path = tmp_path / "creds"
    path.write_text("alice:pw")
    path.chmod(mode)
    with pytest.raises(InputError, match=f"mode {mode:04o}.*chmod 600"):
        load_credentials(path)


@pytest.mark.parametrize("text", ["just-a-word", '{"user": "x"}', "{not json"])
def test_credentials_file_not_understood(tmp_path, text):
    path = tmp_path / "creds"
    path.write_text(text)
    path.chmod(0o600)
    with pytest.raises(InputError, match="credentials file"):
        load_credentials(path)


def test_missing_credentials_file(tmp_path):
    with pytest.raises(InputError, match="cannot be read"):
        load_credentials(tmp_path / "nope")


def test_client_session_carries_the_auth_and_verifies_tls(tmp_path):
    from pipeline.archive.client import ClientOptions, make_client

    url = parse_archive_url("dicomweb+https://pacs/dicom-web")
    basic = make_client(url, Credentials("basic", "alice", "pw"))
    assert basic._session.auth == ("alice", "pw") and basic._session.verify is True
    bearer = make_client(url, Credentials("bearer", secret="tok"), ClientOptions(insecure=True))
    assert bearer._session.headers["Authorization"] == "Bearer tok" and bearer._session.verify is False
    bundle = tmp_path / "ca.pem"
    bundle.write_text("-----BEGIN CERTIFICATE-----\n")
    assert make_client(url, Credentials(), ClientOptions(ca_bundle=bundle))._session.verify == str(bundle)
    with pytest.raises(InputError, match="CA bundle"):
        make_client(url, Credentials(), ClientOptions(ca_bundle=tmp_path / "missing.pem"))


# --- query ------------------------------------------------------------------------------------------


def test_query_is_split_by_level():
    study, series = parse_query("Modality=CT&StudyDate=20240101-20241231&SeriesDescription=*AX*")
    assert study == {"StudyDate": "20240101-20241231", "ModalitiesInStudy": "CT"}
    assert series == {"Modality": "CT", "SeriesDescription": "*AX*"}
    assert parse_query(None) == ({}, {})
    with pytest.raises(InputError, match="not a DICOM attribute keyword"):
        parse_query("Modality=CT&bad key=1")


def test_series_names_hide_the_uid():
    series = RemoteSeries("1.2.3", "1.2.3.4.5", "CT")
    assert series.name.startswith("ct-") and len(series.name) == 15 and "1.2.3" not in series.name
    assert series.name == RemoteSeries("9.9", "1.2.3.4.5", "CT").name  # stable: the series UID only
    assert not RemoteSeries("1", "2", "SEG").is_image and RemoteSeries("1", "2", "MR").is_image


# --- state ---------------------------------------------------------------------------------------------


def test_series_key_follows_the_model_and_settings():
    config = load_config(None, [])
    key = series_key("1.2.3", "sha-a", config)
    assert key == series_key("1.2.3", "sha-a", config)
    assert key != series_key("1.2.4", "sha-a", config)
    assert key != series_key("1.2.3", "sha-b", config)
    assert key != series_key("1.2.3", "sha-a", load_config(None, ["inference.min_component_mm3=7"]))


def test_state_survives_a_reload_and_forgets_pushes_of_another_key(tmp_path):
    state = ArchiveState(tmp_path / "s.json", "http://pacs/dicom-web")
    state.set_series("1.2", key="k1", name="ct-x", status="done", cases=["ct-x"])
    state.set_pushed("1.2", "ct-x_seg.dcm", "abc")
    again = ArchiveState(tmp_path / "s.json", "http://pacs/dicom-web")
    assert again.done("1.2", "k1")["cases"] == ["ct-x"] and again.done("1.2", "k2") is None
    assert again.pushed("1.2") == {"ct-x_seg.dcm": "abc"}
    again.set_series("1.2", key="k2", name="ct-x", status="done", cases=["ct-x"])  # another model
    assert again.pushed("1.2") == {}
    (tmp_path / "bad.json").write_text("{")
    assert ArchiveState(tmp_path / "bad.json", "x").data["series"] == {}


# --- push (a stand-in STOW client) ----------------------------------------------------------------------


class _StowClient:
    def __init__(self, refuse: set):
        self.refuse, self.stored = refuse, []

    def store_instances(self, datasets, study_instance_uid=None):
        name = datasets[0].SeriesDescription
        if name in self.refuse:
            response = requests.Response()
            response.status_code, response.reason = 409, "Conflict"
            raise requests.HTTPError(response=response)
        self.stored.append(name)
        return pydicom.Dataset()

    def search_for_instances(self, study_instance_uid, search_filters):
        return [{"00080018": {"vr": "UI", "Value": [search_filters["SOPInstanceUID"]]}}]


def _dicom(path, description):
    ds = pydicom.Dataset()
    ds.StudyInstanceUID, ds.SeriesDescription = "1.2.3", description
    ds.SOPInstanceUID, ds.SOPClassUID = pydicom.uid.generate_uid(), "1.2.840.10008.5.1.4.1.1.66.4"
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)


def test_push_stores_exactly_what_is_missing(tmp_path):
    _dicom(tmp_path / "c1_seg.dcm", "seg")
    _dicom(tmp_path / "c1_rtstruct.dcm", "rt")
    state = ArchiveState(tmp_path / "state.json", "x")
    client = _StowClient(refuse={"rt"})
    first = push_case(client, state, "1.2", tmp_path, "c1")
    assert (first.pushed, first.stored) == (False, ["c1_seg.dcm"])
    assert first.error == "c1_rtstruct.dcm: store refused: HTTP 409 Conflict"
    client.refuse = set()
    second = push_case(client, state, "1.2", tmp_path, "c1")  # only the refused one again
    assert (second.pushed, second.stored, client.stored) == (True, ["c1_rtstruct.dcm"], ["seg", "rt"])
    assert push_case(client, state, "1.2", tmp_path, "c1").stored == []
    _dicom(tmp_path / "c1_seg.dcm", "seg")  # rewritten (other bytes): stored again
    assert push_case(client, state, "1.2", tmp_path, "c1").stored == ["c1_seg.dcm"]
    assert push_case(client, state, "1.2", tmp_path, "c2").error.startswith("nothing to push")


# --- fetch (a stand-in WADO client) -----------------------------------------------------------------------


class _WadoClient:
    def __init__(self, series_files: dict, missing=()):
        self.series_files, self.missing = series_files, set(missing)
        self.calls = []

    def iter_series(self, study_uid, series_uid, media_types=None):
        self.calls.append(series_uid)
        if series_uid in self.missing:
            response = requests.Response()
            response.status_code, response.reason = 404, "Not Found"
            raise requests.HTTPError(response=response)
        for path in self.series_files[series_uid]:
            yield pydicom.dcmread(path)


def test_fetcher_keeps_at_most_k_series_on_disk_and_reports_a_missing_one(tmp_path):
    series, files = [], {}
    for k in range(5):
        written = write_dicom_series(ct_case((8, 8, 3), seed=k)[0].astype("int16"), make_affine("RAS"),
                                     tmp_path / "src" / str(k), uid_entropy=[f"unit-{k}"])
        uid = pydicom.dcmread(written[0]).SeriesInstanceUID
        files[uid] = written
        series.append(RemoteSeries("1.2", uid, "CT"))
    client = _WadoClient(files, missing=[series[2].series_uid])
    fetcher = SeriesFetcher(client, series, tmp_path / "cache", max_series=2)
    got = []
    for item in fetcher:
        if item.folder is not None:
            assert sorted(p.name for p in item.folder.iterdir()) == ["00001.dcm", "00002.dcm", "00003.dcm"]
            assert len([p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]) <= 2
        time.sleep(0.05)  # the consumer is slower than the fetcher: the bound must hold
        got.append(item)
        fetcher.release(item)
    fetcher.close()
    assert [g.series.series_uid for g in got] == [s.series_uid for s in series]
    assert fetcher.peak_on_disk == 2 and fetcher.retrieved == 4
    assert "HTTP 404" in got[2].error and got[2].folder is None
    assert list((tmp_path / "cache").iterdir()) == []


def test_retrieve_errors_are_one_line_reasons():
    response = requests.Response()
    response.status_code, response.reason = 503, "Service Unavailable"
    assert describe_retrieve_error(requests.HTTPError(response=response)) == \
        "retrieve failed: HTTP 503 Service Unavailable"
    assert describe_retrieve_error(requests.Timeout(), 5.0) == \
        "retrieve failed: the archive did not answer within 5 s (timeout)"
    assert "within 5 s (timeout, 3 attempts)" in describe_retrieve_error(requests.ReadTimeout(), 5.0, 3)
    assert "cannot connect" in describe_retrieve_error(requests.ConnectionError())


def test_state_file_is_json(tmp_path):
    state = ArchiveState(tmp_path / "s.json", "http://x")
    state.set_series("1", key="k", name="n", status="failed", cases=[])
    data = json.loads((tmp_path / "s.json").read_text())
    assert data["format"] == "medseg-dicomweb-state" and data["series"]["1"]["status"] == "failed"


class _Pages:
    """A QIDO search over ``n`` answers that honours ``offset`` or, like Orthanc 1.10, ignores it."""

    def __init__(self, n, honours_offset):
        self.items = [{"0020000D": {"vr": "UI", "Value": [f"1.2.{k}"]}} for k in range(n)]
        self.honours_offset, self.calls = honours_offset, 0

    def __call__(self, limit, offset, **kwargs):
        self.calls += 1
        start = offset if self.honours_offset else 0
        return self.items[start:start + limit]


@pytest.mark.parametrize("n, honours, calls, found", [(7, True, 3, 7), (6, True, 3, 6), (2, True, 1, 2),
                                                       (7, False, 2, 3)])
def test_search_is_paged_and_never_loops(n, honours, calls, found):
    from pipeline.archive.query import search_all

    search = _Pages(n, honours)
    assert len(search_all(search, page=3)) == found and search.calls == calls


def test_cli_refuses_archive_flags_for_a_folder_and_credentials_in_the_address(tmp_path, capsys):
    from pipeline.cli import main

    assert main(["segment", str(tmp_path), str(tmp_path / "out"), "--model", "m.pt", "--push"]) == 2
    assert "need a dicomweb+http(s):// address" in capsys.readouterr().err
    assert main(["segment", "dicomweb+http://me:hunter2@pacs/dicom-web", str(tmp_path / "out"),
                 "--model", "m.pt"]) == 2
    err = capsys.readouterr().err
    assert "never go on the command line" in err and "hunter2" not in err
