"""Credentials in URIs never reach what the project shows or stores: log lines, error messages,
JSON records, MLflow parameters (``pipeline.redact`` and where it is applied)."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import socket
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jobs._cli import entry
from jobs.extract_features import main as extract_main
from pipeline.config import LogOptions
from pipeline.data import storage
from pipeline.data.reuse import differences, job_settings
from pipeline.errors import TrackingError, UserError
from pipeline.logs import RedactFilter, install_redaction
from pipeline.redact import redact, redact_values
from pipeline.training import tracking

SECRET = "S3CRETpw"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

USERS = st.text(st.sampled_from("abcXYZ019-._~%"), min_size=1, max_size=12)
# Anything but whitespace and the characters that end a URI in text ("<>); ':', '@', '/', '%'
# and quotes included, since passwords are not always percent-escaped.
PASSWORDS = st.text(st.characters(min_codepoint=33, max_codepoint=126, exclude_characters='"<>'),
                    min_size=1, max_size=20)
HOSTS = st.sampled_from(["127.0.0.1:5000", "mlflow.example.com", "[::1]:8080", "bucket"])
SCHEMES = st.sampled_from(["http", "https", "s3", "postgresql+psycopg2", "file"])


@settings(max_examples=300, deadline=None)
@given(SCHEMES, USERS, PASSWORDS, HOSTS)
def test_userinfo_password_is_replaced_in_any_uri_in_any_text(scheme, user, password, host):
    text = f"--uri '{scheme}://{user}:{password}@{host}/runs/1' failed: see {scheme}://{user}:{password}@{host}"
    assert redact(text) == f"--uri '{scheme}://{user}:***@{host}/runs/1' failed: see {scheme}://{user}:***@{host}"


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["token", "X-Amz-Signature", "X-Amz-Credential", "sig", "password", "api_key",
                        "access_token", "X-Amz-Security-Token"]),
       st.text(st.characters(min_codepoint=33, max_codepoint=126, exclude_characters="&;#\"'<>"), min_size=1))
def test_secret_query_values_are_replaced(name, value):
    url = f"https://bucket.example.com/photos/a.jpg?x-id=GetObject&{name}={value}&page=2#top"
    assert redact(f"GET {url} failed") == f"GET https://bucket.example.com/photos/a.jpg?x-id=GetObject&{name}=***&page=2#top failed"


@pytest.mark.parametrize("text", ["s3://bucket/photos@2x/a.jpg", "/data/me@home:1/x", "http://host/p?email=a@b.com&page=1",
                                  "gs://b/features", "plain words, user@example.com", "epoch 3: loss=0.1 key_count"])
def test_locations_without_credentials_are_unchanged(text):
    assert redact(text) == text


def test_token_used_as_user_name_and_nested_values():
    record = {"uri": f"https://{SECRET}@github.com/org/repo.git", "n": 3,
              "runs": [{"data_dir": f"s3://key:{SECRET}@bucket/photos"}, None]}
    assert redact_values(record) == {"uri": "https://***@github.com/org/repo.git", "n": 3,
                                     "runs": [{"data_dir": "s3://key:***@bucket/photos"}, None]}


def test_log_handlers_write_redacted_lines():
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    install_redaction([handler])
    install_redaction([handler])  # idempotent: a worker's setup hook may run it again
    logger = logging.getLogger("pipeline.test_secrets")
    logger.addHandler(handler)
    try:
        logger.warning("could not log to MLflow (%s): %s", f"http://u:{SECRET}@h:1", "refused")
    finally:
        logger.removeHandler(handler)
    assert out.getvalue() == "could not log to MLflow (http://u:***@h:1): refused\n"
    assert sum(isinstance(f, RedactFilter) for f in handler.filters) == 1


@dataclasses.dataclass
class _Cfg:
    data_dir: str
    epochs: int = 2


def test_settings_are_redacted_and_a_changed_password_is_not_a_change(tmp_path):
    now = job_settings(_Cfg(f"s3://key:{SECRET}@bucket/photos"))
    assert now == {"data_dir": "s3://key:***@bucket/photos", "epochs": 2}
    assert differences(job_settings(_Cfg("s3://key:other@bucket/photos")), now) == []
    # Settings recorded raw (before redaction existed) compare equal too; other changes still count.
    assert differences({"data_dir": f"s3://key:{SECRET}2@bucket/photos", "epochs": 2}, now) == []
    assert differences(job_settings(_Cfg("s3://key:x@bucket/other")), now) != []
    storage.write_json(str(tmp_path / "manifest.json"), {"data_dir": f"s3://key:{SECRET}@bucket/photos"})
    assert SECRET not in (tmp_path / "manifest.json").read_text()


TRACKING_SCRIPT = """
import json, sys
from pipeline import logs
from pipeline.training import tracking
logs.setup_driver(False)
store, job = sys.argv[1], sys.argv[2]
settings = {{"data_dir": "s3://key:{secret}@bucket/photos", "loader": {{"url": "https://h/x?token={secret}"}}}}
first = tracking.start_run(f"file://user:{secret}@localhost{{store}}", "cats", job, "top", settings)
again = tracking.start_run(f"file://user:changed@localhost{{store}}", "cats", job, "top", settings)
print("same run:", first["run_id"] == again["run_id"])
logs.log.info("any project line: %s", settings["data_dir"])
"""


def test_tracking_never_shows_or_stores_the_password(tmp_path):
    """A real MLflow file store named by a URI with userinfo (MLflow ignores it there, so no
    server is needed): the password reaches no output line, record, parameter or tag, and a
    rerun with a changed password goes on in the same run."""
    store, job = tmp_path / "mlruns", tmp_path / "job"
    job.mkdir()
    env = {**os.environ, "MLFLOW_ALLOW_FILE_STORE": "true"}
    proc = subprocess.run([sys.executable, "-c", TRACKING_SCRIPT.format(secret=SECRET), str(store), str(job)],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "same run: True" in proc.stdout
    assert f"at file://user:***@localhost{store}" in proc.stdout
    assert "any project line: s3://key:***@bucket/photos" in proc.stdout
    assert SECRET not in proc.stdout + proc.stderr
    record = json.loads((job / tracking.RUN_FILE).read_text())
    assert record["uri"] == f"file://user:***@localhost{store}"
    # MLflow's own file store records its artifact location from the URI it was given (userinfo
    # means nothing to a file store); what the job writes, and the run's parameters and tags, are checked.
    written = [os.path.join(d, n) for d, _, names in os.walk(tmp_path) for n in names
               if d.startswith(str(job)) or os.path.basename(d) in ("params", "tags")]
    assert any(p.endswith(os.path.join("params", "data_dir")) for p in written)
    assert any(p.endswith(os.path.join("tags", "output")) for p in written)
    for path in written:
        with open(path, "rb") as f:
            assert SECRET.encode() not in f.read(), path


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_tracking_store_fails_with_the_password_redacted(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    port = _closed_port()
    with pytest.raises(TrackingError, match=rf"the MLflow tracking store http://user:\*\*\*@127\.0\.0\.1:{port} "
                                            r"failed: .*refused") as caught:
        tracking.start_run(f"http://user:{SECRET}@127.0.0.1:{port}", "cats", str(tmp_path), "top", {})
    assert SECRET not in str(caught.value)
    assert os.listdir(tmp_path) == []


def test_option_error_naming_a_uri_prints_it_redacted(capsys):
    assert extract_main(["--data-dir", f"http://user:{SECRET}@127.0.0.1:1/photos"]) == 2
    err = capsys.readouterr().err
    assert "--data-dir 'http://user:***@127.0.0.1:1/photos' cannot be used" in err
    assert SECRET not in err


@dataclasses.dataclass
class _JobCfg(LogOptions):
    pass


@pytest.mark.slow
def test_job_error_naming_a_uri_prints_it_redacted(ray_cluster, capsys):
    def body(_cfg):
        raise UserError(f"s3://key:{SECRET}@bucket/out is held by another run")

    assert entry(_JobCfg, "a job", body)([]) == 2
    err = capsys.readouterr().err
    assert "error: s3://key:***@bucket/out is held by another run" in err.splitlines() and SECRET not in err


def test_the_run_report_shows_the_command_with_its_password_redacted():
    from pipeline.runall import report_command

    shown = report_command(["--mlflow-uri", f"http://user:{SECRET}@127.0.0.1:5000", "--epochs", "2"])
    assert shown == "python -m jobs.run_all --mlflow-uri http://user:***@127.0.0.1:5000 --epochs 2"
