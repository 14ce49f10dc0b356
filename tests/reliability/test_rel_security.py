"""Security: the standalone page's sign-in and file route, the one path policy of the tabs and
the REST route, the WebUI's API authentication, and base models that hold a pickle payload.

The server tests start the real app on a free loopback port and talk HTTP to it; they run
under gradio 3.41 (main env) and gradio 4 (.venv-gradio4, see the Makefile)."""

from __future__ import annotations

import argparse
import os
import socket
import threading
import urllib.error
import urllib.parse
import urllib.request
from http.cookies import SimpleCookie
from pathlib import Path

import pytest
from PIL import Image

from lib_lora.errors import UserError
from lib_lora.ui import serving
from lib_lora.ui.cli import is_loopback

SECRET = "top secret: the key is 42\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- the standalone page: sign-in and the file route ---------------------------------------------

class Page:
    """HTTP to a running app, with the sign-in cookies once signed in."""

    def __init__(self, port: int):
        self.base = f"http://127.0.0.1:{port}"
        self.cookies: dict[str, str] = {}

    def request(self, path: str, data: bytes | None = None) -> tuple[int, bytes, list[str]]:
        req = urllib.request.Request(self.base + path, data=data)
        if self.cookies:
            req.add_header("Cookie", "; ".join(f"{k}={v}" for k, v in self.cookies.items()))
        opener = urllib.request.build_opener(NoRedirect)
        try:
            with opener.open(req, timeout=60) as r:
                return r.status, r.read(), r.headers.get_all("Set-Cookie") or []
        except urllib.error.HTTPError as err:
            return err.code, err.read(), err.headers.get_all("Set-Cookie") or []

    def get(self, path: str) -> tuple[int, bytes]:
        status, body, _ = self.request(path)
        return status, body

    def sign_in(self, user: str, password: str) -> int:
        form = urllib.parse.urlencode({"username": user, "password": password}).encode()
        status, _, set_cookies = self.request("/login", form)
        for header in set_cookies:
            for name, morsel in SimpleCookie(header).items():
                self.cookies[name] = morsel.value
        return status


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):  # a redirect is an answer of its own here
        return None


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The real app (`python -m lib_lora ui`'s start) on loopback with --auth, started from a
    current folder that holds a secret; a run's sample image in the work folder."""
    from lib_lora.ui import cli

    root = tmp_path_factory.mktemp("served")
    cwd = root / "cwd"
    cwd.mkdir()
    (cwd / "secret.txt").write_text(SECRET, encoding="utf-8")
    work = cwd / "work"  # the default layout: ./work and ./output under the current folder
    sample = work / "runs" / "zny" / "samples" / "step1.png"
    sample.parent.mkdir(parents=True)
    Image.new("RGB", (16, 16), (200, 30, 30)).save(sample)
    outside = root / "elsewhere.txt"
    outside.write_text(SECRET, encoding="utf-8")
    port = free_port()
    args = argparse.Namespace(host="127.0.0.1", port=port, base_model="tiny", output_dir=str(cwd / "output"),
                              work_dir=str(work), root=[], auth=["alice:s3cret:with:colons"], auth_file=None,
                              device="cpu")
    old = os.getcwd()
    os.chdir(cwd)
    try:
        app = cli.start(args)
        yield dict(port=port, cwd=cwd, work=work, sample=sample, outside=outside)
        closer = threading.Thread(target=app.close, daemon=True)
        closer.start()
        closer.join(20)
    finally:
        os.chdir(old)


def secret_spellings(cwd: Path, work: Path, outside: Path) -> list[str]:
    """The current folder's secret (and a file elsewhere) as a request may spell it."""
    rel_up = os.path.relpath(cwd, work)  # ".."
    return [
        f"/file={cwd}/secret.txt",
        "/file=secret.txt",
        "/file=./secret.txt",
        f"/file={work}/../secret.txt",
        f"/file={work}/{rel_up}/{rel_up}/{cwd.name}/secret.txt",
        "/file=work/../secret.txt",
        f"/file={urllib.parse.quote(str(cwd / 'secret.txt'), safe='')}",
        f"/file={work}/%2e%2e/secret.txt",
        f"/file={work}/..%2fsecret.txt",
        f"/file={work}/%252e%252e/secret.txt",  # escaped twice
        f"/file/{cwd}/secret.txt",
        f"/file={work}/../../{outside.name}",
        f"/file={outside}",
        "/file=/etc/passwd",
    ]


def test_file_route_serves_only_our_folders_and_needs_the_sign_in(served) -> None:
    page = Page(served["port"])
    sample = served["sample"]
    # Not signed in: our own image needs the sign-in (401), the secret is refused before that.
    assert page.get(f"/file={sample}")[0] == 401
    assert page.sign_in("alice", "wrong") != 200 or not page.cookies
    page.cookies.clear()
    assert page.sign_in("alice", "s3cret:with:colons") == 200 and page.cookies
    status, body = page.get(f"/file={sample}")
    assert status == 200 and body == sample.read_bytes(), "a run's sample image is still served"
    for spelling in secret_spellings(served["cwd"], served["work"], served["outside"]):
        status, body = page.get(spelling)
        assert status in (403, 404), (spelling, status)
        assert b"the key is 42" not in body, spelling


def test_a_symlink_in_the_work_folder_does_not_lead_out(served) -> None:
    link = served["work"] / "runs" / "link.txt"
    link.symlink_to(served["outside"])
    page = Page(served["port"])
    assert page.sign_in("alice", "s3cret:with:colons") == 200
    status, body = page.get(f"/file={link}")
    assert status == 403 and b"the key is 42" not in body


def test_the_page_api_needs_the_sign_in(served) -> None:
    page = Page(served["port"])
    for path in ("/run/predict", "/api/predict"):
        status, _, _ = page.request(path, b'{"fn_index": 0, "data": []}')
        assert status in (401, 403), (path, status)


def test_may_serve_decides_on_the_resolved_path(tmp_path: Path, monkeypatch) -> None:
    work = tmp_path / "work"
    (work / "a").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert serving.may_serve(str(work / "a" / "x.png"), [work])
    assert serving.may_serve("work/a/x.png", [work])
    assert not serving.may_serve("secret.txt", [work])
    assert not serving.may_serve(f"{work}/../secret.txt", [work])
    assert not serving.may_serve(f"{work}/%2e%2e/secret.txt", [work])
    assert not serving.may_serve(f"{work}/a\0.png", [work])
    assert not serving.may_serve(f"{tmp_path}/workshop/x.png", [work]), "a sibling that shares the prefix"
    assert serving.file_route_target("/file=/a/b") == "/a/b"
    assert serving.file_route_target("/file/a/b") == "a/b"
    assert serving.file_route_target("/config") is None


def test_beyond_loopback_a_sign_in_is_always_required() -> None:
    for host in ("0.0.0.0", "192.168.1.20", "::", "example.org"):
        assert not is_loopback(host), host
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        assert is_loopback(host), host
    assert serving.sign_in(loopback=True) == (None, None), "loopback without --auth stays open"
    creds, password = serving.sign_in(loopback=False)
    assert creds == [(serving.DEFAULT_USER, password)] and len(password) >= 16
    assert serving.sign_in(loopback=False)[1] != password, "a new password at each start"
    assert serving.sign_in(loopback=False, auth=["bob:pw"]) == ([("bob", "pw")], None)
    assert serving.sign_in(loopback=True, auth=["bob:pw"]) == ([("bob", "pw")], None)
    with pytest.raises(UserError, match="USER:PASSWORD"):
        serving.sign_in(loopback=False, auth=["bob"])
    with pytest.raises(UserError, match="USER:PASSWORD"):
        serving.sign_in(loopback=False, auth=["bob:"])


def test_auth_file(tmp_path: Path) -> None:
    f = tmp_path / "users.txt"
    f.write_text("# who may sign in\nalice:one\n\nbob:two:three\n", encoding="utf-8")
    assert serving.sign_in(loopback=False, auth_file=str(f)) == ([("alice", "one"), ("bob", "two:three")], None)
    with pytest.raises(UserError, match="cannot be read"):
        serving.sign_in(loopback=False, auth_file=str(tmp_path / "missing.txt"))


# ---- one path policy for every path a request names ------------------------------------------------

@pytest.fixture()
def remote(tmp_path: Path):
    """The tabs as a page served beyond loopback sees them: paths limited to work and output,
    an image folder inside, and outside a secret text file and a folder."""
    from lib_lora.hosts.standalone import StandaloneHost
    from lib_lora.ui.context import UIContext
    from lib_lora.ui.paths import FolderPolicy

    host = StandaloneHost(output_dir=tmp_path / "loras", work_dir=tmp_path / "work", device="cpu")
    ctx = UIContext(host=host, policy=FolderPolicy.limited([host.work_dir(), host.lora_dir()]))
    images = host.work_dir() / "ds" / "10_zny"
    images.mkdir(parents=True)
    Image.new("RGB", (64, 64), (90, 120, 30)).save(images / "a.png")
    (images / "a.txt").write_text("zny, smile", encoding="utf-8")
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.txt"
    secret.write_text("".join(f"line{i}\n" for i in range(25)), encoding="utf-8")
    return dict(ctx=ctx, images=images, outside=outside, secret=secret, missing=outside / "nothing-here.txt")


def refusal(html: str, path: Path) -> str:
    """A refusal with the path taken out, to compare the refusals of two paths."""
    return html.replace(str(path), "<path>")


def assert_refused(html: str, path: Path) -> None:
    assert "outside the folders this server may use" in html, html
    for leak in ("does not exist", "not found", "lists", "tags", "line", "25", "Not found"):
        assert leak not in refusal(html, path).split("(")[0], (leak, html)


def form_values(cls, names: list[str], **changes) -> list:
    from lib_lora.ui import forms

    values = dict(zip(names, forms.values_of(cls(), names), strict=True))
    values.update(changes)
    return [values[n] for n in names]


def test_tag_tab_file_fields_go_through_the_policy(remote) -> None:
    from lib_lora import config
    from lib_lora.ui import forms, tab_tag

    ctx, images = remote["ctx"], remote["images"]
    names = [f.name for f in forms.fields(config.TagConfig, skip=tab_tag.RULE_FIELDS)]
    seen = {}
    for field in ("tags_file", "model"):
        for target in (remote["secret"], remote["missing"], remote["outside"]):
            values = form_values(config.TagConfig, names, **{field: str(target)})
            out = list(tab_tag.run_tag(ctx, str(images.parent), names, *values))
            html = out[0][0]
            assert len(out) == 1 and not ctx.runner.busy(), "refused before any job starts"
            assert_refused(html, target)
            seen.setdefault(field, set()).add(refusal(html, target))
    assert all(len(v) == 1 for v in seen.values()), "the same sentence whether the path exists or not"
    assert (images / "a.txt").read_text(encoding="utf-8") == "zny, smile", "no caption came from the outside file"


def test_prepare_tab_model_fields_go_through_the_policy(remote) -> None:
    from lib_lora import config
    from lib_lora.ui import forms, tab_prepare

    ctx = remote["ctx"]
    names = [f.name for f in forms.fields(config.PrepareConfig)]
    new_folder = remote["outside"] / "models" / "u2net"
    cases = [("model_dir", new_folder), ("remove_bg", remote["outside"] / "bg.onnx"),
             ("face_model", remote["outside"] / "yunet.onnx"), ("out", remote["outside"] / "work")]
    for field, target in cases:
        values = form_values(config.PrepareConfig, names, name="zny", **{field: str(target)},
                             **({"remove_bg": "u2net"} if field == "model_dir" else {}))
        out = list(tab_prepare.run_prepare(ctx, str(remote["images"]), names, *values))
        assert len(out) == 1 and not ctx.runner.busy(), field
        assert_refused(out[0][0], target)
    assert not (remote["outside"] / "models").exists(), "no folder was made outside"
    assert not (remote["outside"] / "work").exists()


def test_train_tab_base_model_goes_through_the_policy(remote) -> None:
    from lib_lora import config
    from lib_lora.ui import forms, tab_train

    ctx = remote["ctx"]
    names = [f.name for f in forms.fields(config.TrainConfig, skip=tab_train.SPECIAL)]
    form = tab_train.TrainForm(names, has_base_model=True)
    ckpt = remote["outside"] / "model.safetensors"
    ckpt.write_bytes(b"not a model")
    seen = set()
    for target in (ckpt, remote["missing"], remote["outside"], Path("/etc/shadow")):
        values = form_values(config.TrainConfig, names, base_model=str(target))
        out = list(tab_train.run_train(ctx, form, "zny", str(remote["images"].parent), "manual", "1e-4", *values))
        assert len(out) == 1 and not ctx.runner.busy()
        assert_refused(out[0][0], target)
        seen.add(refusal(out[0][0], target))
        assert "outside" in tab_train.step_count(ctx, form, str(remote["images"].parent), values)
    assert len(seen) == 1, seen
    for field in ("run_dir",):
        values = form_values(config.TrainConfig, names, **{field: str(remote["outside"] / "runs")})
        out = list(tab_train.run_train(ctx, form, "zny", str(remote["images"].parent), "manual", "1e-4", *values))
        assert_refused(out[0][0], remote["outside"] / "runs")
    assert not (remote["outside"] / "runs").exists()
    # Inside the allowed folders, and the built-in model by name, are still fine.
    values = form_values(config.TrainConfig, names, base_model="tiny")
    cfg = form.config(ctx, "zny", str(remote["images"].parent), "manual", "1e-4", values)
    assert cfg.base_model == "tiny" and Path(cfg.dataset) == remote["images"].parent.resolve()


def test_the_policy_refuses_the_same_way_whatever_is_there(tmp_path: Path) -> None:
    from lib_lora.config import TagConfig
    from lib_lora.ui.paths import FolderPolicy

    root = tmp_path / "work"
    root.mkdir()
    (root / "link").symlink_to(tmp_path)
    policy = FolderPolicy.limited([root], names=["/models/mine.safetensors"])
    for bad in ("/etc/shadow", "/nonexistent/x", "../x", "link/secret", "~/x"):
        with pytest.raises(UserError) as err:
            policy.check(bad, "tags file", kind="file")
        assert str(err.value) == (f"The tags file {bad} is outside the folders this server may use ({root.resolve()}); "
                                  "put it under one of them.")
    with pytest.raises(UserError, match="not a usable path"):
        policy.check("a\0b", "tags file", kind="file")
    cfg = policy.check_config(TagConfig(tags_file="lists/tags.txt"))
    assert cfg.tags_file == str(root.resolve() / "lists" / "tags.txt"), "relative: under the first root"
    # The config's own check (implications file must exist) never sees an outside path.
    with pytest.raises(UserError, match="outside"):
        policy.check_config(TagConfig(implications_file="/etc/passwd"))
    assert FolderPolicy().check_config(TagConfig(tags_file="/etc/x")).tags_file == "/etc/x", "loopback: as given"
    from lib_lora.config import TrainConfig

    assert policy.check_config(TrainConfig(base_model="/models/mine.safetensors")).base_model == "/models/mine.safetensors"
    with pytest.raises(UserError, match="outside"):
        policy.check_config(TrainConfig(base_model="/models/other.safetensors"))


# ---- a base model that holds a pickle payload ---------------------------------------------------

class Payload:
    """Unpickling this runs code: it writes the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('the payload ran')",)


@pytest.fixture()
def diffusers_folder(tmp_path: Path, bb) -> Path:
    """The tiny model as a diffusers folder whose text encoder is stored the old way (.bin)."""
    folder = tmp_path / "tiny-diffusers"
    bb.unet.save_pretrained(folder / "unet")
    bb.vae.save_pretrained(folder / "vae")
    bb.text_encoder.save_pretrained(folder / "text_encoder", safe_serialization=False)
    bb.tokenizer.save_pretrained(folder / "tokenizer")
    assert (folder / "text_encoder" / "pytorch_model.bin").is_file()
    assert not (folder / "text_encoder" / "model.safetensors").exists()
    return folder


def test_a_plain_bin_text_encoder_still_loads(diffusers_folder: Path, bb) -> None:
    import torch

    from lib_lora.training.models import load_backbone

    loaded = load_backbone(str(diffusers_folder))
    want, got = bb.text_encoder.state_dict(), loaded.text_encoder.state_dict()
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_a_pickle_payload_in_a_diffusers_folder_never_runs(diffusers_folder: Path, tmp_path: Path, monkeypatch) -> None:
    """torch >= 2.6 defaults to weights_only; TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD gives back the old
    default (torch < 2.6, the WebUI's 2.1.2) to every torch.load that does not ask for it, as
    transformers 4.30 does not."""
    import torch

    from lib_lora.errors import ModelLoadError
    from lib_lora.training.models import load_backbone

    marker = tmp_path / "pwned.txt"
    torch.save({"text_model.embeddings.token_embedding.weight": Payload(marker)},
               diffusers_folder / "text_encoder" / "pytorch_model.bin")
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    for part in ("unet", "vae"):  # a payload beside a safetensors file is never opened either
        torch.save({"x": Payload(marker)}, diffusers_folder / part / "diffusion_pytorch_model.bin")
    with pytest.raises(ModelLoadError) as err:
        load_backbone(str(diffusers_folder))
    assert not marker.exists(), "the payload ran"
    text = str(err.value)
    assert "pytorch_model.bin was refused" in text and "\n" not in text
    assert len(text) < 400


# ---- inside the WebUI: the same policy beyond loopback, and --api-auth on our REST routes ------------
# A1111 v1.10.1 (commit 82a973c04367123ae98bd9abdf80d9eda9b910e2), modules/api/api.py: `Api.__init__`
# reads cmd_opts.api_auth ("u1:p1,u2:p2"), `add_api_route` adds `Depends(self.auth)` to every
# /sdapi route when it is set, and `auth` checks HTTPBasic credentials with compare_digest, else
# 401 "Incorrect username or password" with WWW-Authenticate: Basic. Without --api-auth the
# routes are open. modules/shared_cmd_options.py: webui_is_non_local = share, listen, ngrok or server_name.

@pytest.fixture()
def webui(tmp_path: Path):
    """The fake `modules` package of tests/webui (each fake names the A1111 file it mirrors)."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("webui_conftest_for_security",
                                                  Path(__file__).parents[1] / "webui" / "conftest.py")
    helpers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helpers)
    helpers._drop_fake_modules()
    sys.path.insert(0, str(helpers.FAKE_ROOT))
    try:
        yield helpers.FakeWebUI(tmp_path)
    finally:
        sys.path.remove(str(helpers.FAKE_ROOT))
        helpers._drop_fake_modules()


def test_webui_tabs_and_rest_limit_paths_when_listening(webui, tmp_path: Path, monkeypatch) -> None:
    from lib_lora.hosts import webui as host_module
    from lib_lora.hosts import webui_app

    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    extra = tmp_path / "extra"
    monkeypatch.setenv(host_module.ROOTS_ENV, str(extra))
    for flags in ({"listen": True}, {"share": True}, {"server_name": "0.0.0.0"}, {"ngrok": "token"}):
        for k, v in flags.items():
            setattr(webui.shared.cmd_opts, k, v)
        host = host_module.WebUIHost()
        policy = host.path_policy()
        assert policy.restricted, flags
        assert {Path(webui.paths.models_path).resolve(), host.lora_dir().resolve(), host.work_dir().resolve(),
                extra.resolve()} <= set(policy.roots)
        for k in flags:
            setattr(webui.shared.cmd_opts, k, None if k in ("server_name", "ngrok") else False)
    webui.shared.cmd_opts.server_name = "127.0.0.1"
    assert not host_module.WebUIHost().path_policy().restricted, "a loopback server name is local"
    webui.shared.cmd_opts.listen = True
    host = host_module.WebUIHost()
    for body in ({"name": "a", "dataset": str(outside)}, {"name": "a", "dataset": "/etc"},
                 {"name": "a", "dataset": str(host.work_dir() / "ds"), "run_dir": str(outside / "runs")},
                 {"name": "a", "dataset": str(host.work_dir() / "ds"), "output_dir": "/etc"}):
        with pytest.raises(UserError, match="outside the folders this server may use"):
            webui_app.config_from_request(body, host.path_policy())
    cfg = webui_app.config_from_request({"name": "a", "dataset": "ds"}, host.path_policy())
    assert Path(cfg.dataset) == (host.work_dir() / "ds").resolve()
    assert not outside.exists()
    # The tabs get the same policy: a folder outside is refused by the Tag tab's handler.
    from lib_lora.ui import tab_tag
    from lib_lora.ui.context import UIContext

    ctx = UIContext(host=host, policy=host.path_policy())
    assert "outside the folders" in tab_tag.show_folder(ctx, "/etc")[0]


def test_webui_rest_routes_use_the_webui_api_auth(webui) -> None:
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from lib_lora.hosts import webui as host_module
    from lib_lora.hosts import webui_app

    def client() -> TestClient:
        app = FastAPI()
        webui_app.mount_api(app, host_module.WebUIHost())
        return TestClient(app)

    open_client = client()
    assert open_client.get("/fastlora/v1/progress").status_code == 200, "no --api-auth: open, like /sdapi"
    webui.shared.cmd_opts.api_auth = "alice:pw1,bob:pw:2"
    guarded = client()
    for method, path in (("get", "progress"), ("post", "stop"), ("post", "train")):
        call = getattr(guarded, method)
        kw = {"json": {"name": "a", "dataset": "/etc"}} if path == "train" else {}
        r = call(f"/fastlora/v1/{path}", **kw)
        assert r.status_code == 401 and r.headers.get("www-authenticate") == "Basic", path
        assert call(f"/fastlora/v1/{path}", auth=("alice", "wrong"), **kw).status_code == 401, path
        assert call(f"/fastlora/v1/{path}", auth=("mallory", "pw1"), **kw).status_code == 401, path
    assert guarded.get("/fastlora/v1/progress", auth=("alice", "pw1")).status_code == 200
    assert guarded.get("/fastlora/v1/progress", auth=("bob", "pw:2")).status_code == 200
    assert guarded.post("/fastlora/v1/stop", auth=("alice", "pw1")).json()["stopping"] is False
    webui.shared.cmd_opts.api_auth = "no-colon"
    assert client().get("/fastlora/v1/progress", auth=("no-colon", "")).status_code == 401, "malformed: locked"
