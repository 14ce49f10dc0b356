"""How the standalone page is served: who may sign in, and which files its file route serves.

gradio serves files named in the URL (`/file=<path>`, `/file/<path>`). gradio 3.41 serves any
file under the process's current folder, gradio 4 what its allowed paths and environment
(GRADIO_ALLOWED_PATHS) say; both compare paths as written. `FileGuard` makes the decision
ours, the same under both: the path is resolved (`..`, symlinks, percent-escapes) and served
only when it lies under our own folders (work, LoRA output, configured roots) or gradio's
upload/cache folder, where the images the page shows are written.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from lib_lora.errors import UserError

DEFAULT_USER = "fastlora"
FILE_ROUTES = ("/file=", "/file/")


def is_loopback(host: str) -> bool:
    """Whether only this machine can reach an address ('' and localhost count as loopback)."""
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ---- sign-in -----------------------------------------------------------------------------------

def parse_credentials(items: Iterable[str], source: str = "--auth") -> list[tuple[str, str]]:
    """USER:PASSWORD entries (the password may contain ':'), blank ones skipped."""
    out = []
    for item in items:
        item = item.strip()
        if not item or item.startswith("#"):
            continue
        user, sep, password = item.partition(":")
        if not sep or not user.strip() or not password:
            raise UserError(f"{source}: {user.strip() or item!r} is not USER:PASSWORD; give both, separated by ':'.")
        out.append((user.strip(), password))
    return out


def read_credentials_file(path: str | Path) -> list[tuple[str, str]]:
    """One USER:PASSWORD per line (# starts a comment line)."""
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"--auth-file {path} cannot be read ({err}); give a text file of USER:PASSWORD lines.") from None
    creds = parse_credentials(text.splitlines(), f"--auth-file {path}")
    if not creds:
        raise UserError(f"--auth-file {path} has no USER:PASSWORD line.")
    return creds


def sign_in(loopback: bool, auth: Iterable[str] = (), auth_file: str | None = None
            ) -> tuple[list[tuple[str, str]] | None, str | None]:
    """(credentials or None, the generated password or None).

    On loopback the page stays open as before unless credentials are given. Beyond loopback
    it always needs them: without --auth or --auth-file a random password is made for
    DEFAULT_USER (new at each start), for the caller to print."""
    creds = parse_credentials(auth)
    if auth_file:
        creds += read_credentials_file(auth_file)
    if creds:
        return creds, None
    if loopback:
        return None, None
    password = secrets.token_urlsafe(12)
    return [(DEFAULT_USER, password)], password


# ---- the file route ----------------------------------------------------------------------------

def file_route_target(path: str) -> str | None:
    """The file a request path asks gradio for, or None for other routes."""
    for prefix in FILE_ROUTES:
        at = path.find(prefix)
        if at != -1:
            return path[at + len(prefix):]
    return None


def gradio_upload_dir(app: Any) -> Path:
    """Where gradio writes uploads and the images a handler returns (its own attribute when present)."""
    folder = getattr(app, "uploaded_file_dir", None)
    if folder:
        return Path(folder)
    return Path(os.environ.get("GRADIO_TEMP_DIR") or Path(tempfile.gettempdir()) / "gradio")


def _real(path: str | Path) -> Path:
    return Path(os.path.realpath(os.path.join(os.getcwd(), os.fspath(path))))


def may_serve(target: str, roots: Iterable[Path]) -> bool:
    """Whether the file route may serve `target`: every reading of it (as sent, and with
    percent-escapes decoded once more) must resolve under one of the roots."""
    real_roots = [_real(r) for r in roots]
    readings = {target, unquote(target)}
    for text in readings:
        if "\0" in text:
            return False
        try:
            real = _real(text)
        except (OSError, ValueError):
            return False
        if not any(real == r or r in real.parents for r in real_roots):
            return False
    return True


class FileGuard:
    """ASGI middleware: the file routes answer 403 for anything outside `roots` (plus gradio's
    upload folder). Installed through the app's constructor, so it wraps every route."""

    def __init__(self, app: Any, roots: Iterable[str | Path]):
        self.app = app
        self.roots = [Path(r) for r in roots]

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope.get("type") == "http":
            target = file_route_target(scope.get("path", ""))
            if target is not None:
                roots = [*self.roots, gradio_upload_dir(scope.get("app"))]
                if not may_serve(target, roots):
                    await _forbidden(send)
                    return
        await self.app(scope, receive, send)


async def _forbidden(send: Any) -> None:
    body = b"File not allowed."
    await send({"type": "http.response.start", "status": 403,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def guard_kwargs(roots: Iterable[str | Path]) -> dict[str, Any]:
    """`app_kwargs` for gradio's launch (both 3.41 and 4.x pass them to the FastAPI app)."""
    from starlette.middleware import Middleware

    return {"middleware": [Middleware(FileGuard, roots=list(roots))]}
