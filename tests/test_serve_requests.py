"""Fast tier of serving's hardening: the request-body parser as a plain function (every malformed
body is a ``RequestError`` with a 4xx status, never anything else) and the token options
(listening beyond loopback needs a token or ``--insecure``)."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jobs.serve import main as serve_main
from pipeline.config import ServeConfig
from pipeline.errors import ConfigError
from pipeline.prechecks import preflight
from pipeline.serving.auth import TOKEN_ENV, authorized, check_exposure, is_loopback, read_token, token_digest
from pipeline.serving.requests import RequestError, parse_body

LIMIT = 64
JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                      max_size=4), max_leaves=20)
CONTENT_TYPES = st.sampled_from(["application/json", "Application/JSON; charset=utf-8", " APPLICATION/json ;x=1",
                                 "image/jpeg", "application/octet-stream", "", "text/plain", "multipart/form-data",
                                 "application/x-www-form-urlencoded"]) | st.text(max_size=30)


def refusal(body: bytes, content_type: str = "application/json") -> RequestError:
    with pytest.raises(RequestError) as caught:
        parse_body(body, content_type, LIMIT)
    return caught.value


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@settings(max_examples=150, deadline=None)
@given(value=JSON_VALUES, wrap=st.booleans(), content_type=CONTENT_TYPES)
def test_random_json_bodies_and_content_types_give_images_or_a_4xx(value, wrap, content_type):
    body = json.dumps({"images": value} if wrap else value).encode()
    try:
        parsed = parse_body(body, content_type, LIMIT)
    except RequestError as exc:
        assert 400 <= exc.status < 500 and exc.error and exc.detail
    else:
        assert all(isinstance(image, bytes) for image in parsed.images)


@settings(max_examples=60, deadline=None)
# Depths around the parser's recursion limit and far past it, not just the small ones Hypothesis favours.
@given(depth=st.integers(0, 50) | st.integers(900, 1100) | st.integers(10_000, 200_000), opener=st.sampled_from(["[", '{"a":', '{"images":[']),
       body=st.binary(max_size=64), cut=st.booleans())
def test_random_nesting_and_bytes_give_a_4xx_never_a_crash(depth, opener, body, cut):
    closer = {"[": "]", '{"a":': "}", '{"images":[': "]}"}[opener]
    nested = (opener * depth + "1" + closer * depth).encode()
    for data in (nested[: len(nested) // 2] if cut else nested, body):
        try:
            parse_body(data, "application/json", LIMIT)
        except RequestError as exc:
            assert 400 <= exc.status < 500


def test_deeply_nested_json_is_a_400_naming_the_nesting():
    exc = refusal(b"[" * 100_000 + b"]" * 100_000)
    assert (exc.status, exc.error, exc.detail) == (400, "invalid json", "nested too deeply")


def test_too_many_images_are_refused_before_any_is_decoded():
    # Entries that are not base64 at all: decoding any of them would give "bad base64" instead.
    body = json.dumps({"images": ["!"] * 20_000}).encode()
    exc = refusal(body)
    assert (exc.status, exc.error) == (413, "too many images")
    assert "20000 images; the limit is 64 (--max-images-per-request)" == exc.detail
    assert len(parse_body(json.dumps({"images": [b64(b"x")] * LIMIT}).encode(), "application/json", LIMIT).images) == LIMIT


@pytest.mark.parametrize("body, error", [
    (b"", "empty body"), (b"  \n", "empty body"), (b"{not json", "invalid json"), (b"\xff\xfe\xfa", "invalid json"),
    (b'["a"]', "bad request"), (b'{"image": []}', "bad request"), (b'{"images": "abc"}', "bad request"),
    (b'{"images": [1]}', "bad request"), (b'{"images": ["not base64!"]}', "bad base64"),
    ('{"images": ["\u00e9"]}'.encode(), "bad base64"),
])
def test_malformed_json_bodies_are_400_with_the_reason(body, error):
    exc = refusal(body)
    assert (exc.status, exc.error) == (400, error)


@pytest.mark.parametrize("content_type", ["application/json", "Application/JSON", "APPLICATION/JSON; charset=utf-8",
                                          " application/json ; charset=UTF-8"])
def test_json_content_type_is_matched_without_case_or_parameters(content_type):
    parsed = parse_body(json.dumps({"images": [b64(b"one"), b64(b"two")]}).encode(), content_type, LIMIT)
    assert parsed.batch and parsed.images == [b"one", b"two"]


@pytest.mark.parametrize("content_type", ["image/jpeg", "IMAGE/PNG", "application/octet-stream", "",
                                          "application/x-www-form-urlencoded"])
def test_raw_content_types_are_one_image(content_type):
    parsed = parse_body(b"\xff\xd8bytes", content_type, LIMIT)
    assert not parsed.batch and parsed.images == [b"\xff\xd8bytes"]


@pytest.mark.parametrize("content_type", ["text/plain", "multipart/form-data; boundary=x", "application/xml"])
def test_unknown_content_types_are_415(content_type):
    exc = refusal(b"whatever", content_type)
    assert (exc.status, exc.error) == (415, "unsupported media type") and "application/json" in exc.detail


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.5", "::", "example.com"])
def test_a_host_beyond_loopback_without_a_token_is_refused_before_anything(host, monkeypatch, capsys):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    # The model does not exist: the exposure is refused first, naming the options that fix it.
    with pytest.raises(ConfigError, match="--auth-token-file.*IMAGE_CLASSIFIER_TOKEN.*--insecure"):
        preflight(ServeConfig(model="/nonexistent/model.keras", host=host))
    # The job refuses it before Ray starts: its main runs the preflight before init_ray.
    assert serve_main(["--model", "/nonexistent/model.keras", "--host", host]) == 2
    assert "--insecure" in capsys.readouterr().err


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.9.10", "::1", "[::1]", "localhost", "LOCALHOST"])
def test_loopback_hosts_need_no_token(host):
    assert is_loopback(host)
    check_exposure(host, None, insecure=False)


def test_a_token_or_insecure_allows_any_host(tmp_path, monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    check_exposure("0.0.0.0", "secret", insecure=False)
    check_exposure("0.0.0.0", None, insecure=True)
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    assert read_token(str(token_file)) == "s3cret"
    assert read_token(None) is None
    monkeypatch.setenv(TOKEN_ENV, " from-env ")
    assert read_token(None) == "from-env"
    assert read_token(str(token_file)) == "s3cret"  # the file wins


def test_an_empty_or_missing_token_file_is_refused(tmp_path):
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        read_token(str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="cannot be read"):
        read_token(str(tmp_path / "absent"))


def test_only_the_right_bearer_token_is_authorized():
    digest = token_digest("s3cret")
    assert authorized("Bearer s3cret", digest) and authorized("bearer  s3cret ", digest)
    for header in ("", "Bearer", "Bearer s3cre", "Bearer s3cret2", "Basic s3cret", "s3cret"):
        assert not authorized(header, digest), header
    assert authorized("", token_digest(None))
