"""API-key entries and scopes: old files keep working, admin RPCs need the admin scope."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2
from runtime.probe_app import ProbeApp, method, unary
from support import ServerThread

from llmsuite.client.errors import error_details
from llmsuite.runtime.auth import ADMIN_SCOPE, USER_SCOPE, parse_keys
from llmsuite.runtime.settings import EnvArgumentParser, ServerSettings, add_server_arguments


def test_entries_without_scopes_keep_their_meaning_and_get_the_user_scope():
    bare, named, admin, both = parse_keys(["k1", "alice k2", "ops k3 admin", "oncall k4 user,admin"])
    assert bare.name.startswith("key-") and bare.secret == b"k1" and bare.scopes == {USER_SCOPE}
    assert (named.name, named.secret, named.scopes) == ("alice", b"k2", {USER_SCOPE})
    assert admin.scopes == {ADMIN_SCOPE} and both.scopes == {USER_SCOPE, ADMIN_SCOPE}


@pytest.mark.parametrize("entry", ["ops s3cret-value root", "ops s3cret-value ,", "a s3cret-value b c"])
def test_bad_entries_are_rejected_without_echoing_the_key(entry):
    with pytest.raises(ValueError) as caught:
        parse_keys(["fine-key", entry])
    assert "s3cret" not in str(caught.value) and "entry 2" in str(caught.value)


def test_admin_methods_need_the_admin_scope_and_others_the_user_scope():
    async def ok(request, context):
        return health_pb2.HealthCheckResponse()

    app = ProbeApp({"Use": unary(ok), "Administer": unary(ok)}, admin_methods=[method("Administer")])
    settings = ServerSettings(listen="127.0.0.1:0", log_format="text",
                              api_keys=("u user-key", "a admin-key admin", "b both-key user,admin"))
    with ServerThread(app, settings) as srv, srv.channel() as ch:
        def call(name: str, key: str) -> grpc.StatusCode:
            try:
                ch.unary_unary(method(name))(b"", metadata=(("authorization", f"Bearer {key}"),))
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.PERMISSION_DENIED:
                    assert error_details(exc)["reason"] == "MISSING_SCOPE"
                return exc.code()
            return grpc.StatusCode.OK

        assert call("Use", "user-key") == grpc.StatusCode.OK
        assert call("Administer", "user-key") == grpc.StatusCode.PERMISSION_DENIED
        assert call("Administer", "admin-key") == grpc.StatusCode.OK
        assert call("Use", "admin-key") == grpc.StatusCode.PERMISSION_DENIED
        assert call("Use", "both-key") == call("Administer", "both-key") == grpc.StatusCode.OK
        assert call("Administer", "wrong-key") == grpc.StatusCode.UNAUTHENTICATED


def test_help_steers_keys_to_the_file_or_the_environment():
    parser = EnvArgumentParser(environ={})
    add_server_arguments(parser, default_listen="0.0.0.0:1")
    text = " ".join(parser.format_help().split())
    assert "--api-keys-file or the variable" in text and "ps" in text and "'admin'" in text
