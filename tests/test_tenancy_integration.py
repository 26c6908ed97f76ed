"""
Ownership and sharing with real ipykernel kernels: an in-process gateway
with per-user tokens, where a second user tries every kernel route and the
channels WebSocket on the first user's kernel, and then is let in by
sharing.
"""

from __future__ import annotations

import base64
import os
from typing import Any

import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred

from tests.support.gateway import GatewayTestCase
from tests.support.wsclient import ChannelsClient
from tests.test_tenancy import USERS, token_of, write_tokens

UNKNOWN = "0b5e3a0c-1d8e-4f55-9b9e-3f0e6c1a2b3c"


class TokensGatewayTestCase(GatewayTestCase):
    """
    A gateway whose users authenticate with per-user tokens (alice and dave
    in group physics, carol an admin, bob and erin plain users).
    """

    extra_settings: dict[str, str] = {}

    async def setUp(self) -> None:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        path = self.tokens_file = os.path.join(directory, "tokens.toml")
        write_tokens(path)
        self.gateway_settings = {"user_tokens_file": path, "list_kernels": "true", **self.extra_settings}
        await super().setUp()

    async def call(self, method: str, path: str, user: str, body: Any = None) -> tuple[int, Any]:
        return await self.gateway.request(method, path, body, token=token_of(user))

    async def upgrade(self, kernel_id: str, user: str, session: str = "s1") -> tuple[int, bytes]:
        """
        A WebSocket handshake for the kernel's channels, as a browser sends
        it; the status and body of the answer.
        """
        response = await treq.get(
            f"{self.gateway.url}api/kernels/{kernel_id}/channels?session_id={session}",
            headers={
                "Authorization": f"token {token_of(user)}",
                "Connection": "Upgrade",
                "Upgrade": "websocket",
                "Sec-WebSocket-Version": "13",
                "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
            },
            pool=self.gateway.pool,
            timeout=10,
        )
        return response.code, await response.content()


class OtherUsersRefused(TokensGatewayTestCase):
    async def test_every_route_and_the_websocket(self) -> None:
        """
        bob, trying alice's kernel as a new user would (list, get, connect,
        interrupt, restart, delete, share), is told it does not exist and
        changes nothing; alice's kernel keeps working; shared with bob, it
        lets him in (REST and WebSocket) but not reshare; an admin sees it.
        """
        model = await self.gateway.start_kernel(token=token_of("alice"))
        kid = model["id"]
        self.assertEqual(model["owner"], "alice")

        code, listed = await self.call("GET", "api/kernels", "bob")
        self.assertEqual((code, listed), (200, []))
        for method, suffix, body in (
            ("GET", "", None),
            ("POST", "/interrupt", None),
            ("POST", "/restart", None),
            ("DELETE", "", None),
            ("PUT", "/acl", {"users": ["bob"]}),
        ):
            code, theirs = await self.call(method, f"api/kernels/{kid}{suffix}", "bob", body)
            self.assertEqual(code, 404, (method, suffix, theirs))
            code, unknown = await self.call(method, f"api/kernels/{UNKNOWN}{suffix}", "bob", body)
            self.assertEqual(theirs["message"].replace(kid, UNKNOWN), unknown["message"])
        code, body = await self.upgrade(kid, "bob")
        self.assertEqual(code, 404, body)
        with self.assertRaises(ConnectionError):
            await ChannelsClient.connect(self.gateway.url, kid, token=token_of("bob"))

        code, mine = await self.call("GET", f"api/kernels/{kid}", "alice")
        self.assertEqual((code, mine["restarts"], mine["state"]), (200, 0, "running"))
        client = await ChannelsClient.connect(self.gateway.url, kid, token=token_of("alice"))
        result = await client.execute("x = 6 * 7; x")
        self.assertEqual(result["result"]["text/plain"], "42")
        await client.close()

        code, shared = await self.call("PUT", f"api/kernels/{kid}/acl", "alice", {"users": ["bob"]})
        self.assertEqual((code, shared["acl"]["users"]), (200, ["bob"]))
        code, _ = await self.call("GET", f"api/kernels/{kid}", "bob")
        self.assertEqual(code, 200)
        code, listed = await self.call("GET", "api/kernels", "bob")
        self.assertEqual([k["id"] for k in listed], [kid])
        client = await ChannelsClient.connect(self.gateway.url, kid, token=token_of("bob"))
        result = await client.execute("x + 1")
        self.assertEqual(result["result"]["text/plain"], "43")
        await client.close()
        code, _ = await self.call("POST", f"api/kernels/{kid}/interrupt", "bob")
        self.assertEqual(code, 204)
        code, refusal = await self.call("PUT", f"api/kernels/{kid}/acl", "bob", {"users": ["bob", "erin"]})
        self.assertEqual(code, 403, refusal)
        code, _ = await self.call("GET", f"api/kernels/{kid}", "erin")
        self.assertEqual(code, 404)

        code, listed = await self.call("GET", "api/kernels", "carol")
        self.assertEqual([k["id"] for k in listed], [kid])
        code, _ = await self.call("DELETE", f"api/kernels/{kid}", "alice")
        self.assertEqual(code, 204)

    async def test_group_sharing(self) -> None:
        """
        Shared with group physics, bob's kernel runs code for dave (a
        member) while erin (not one) cannot connect.
        """
        kid = (await self.gateway.start_kernel(token=token_of("bob")))["id"]
        code, _ = await self.call("PUT", f"api/kernels/{kid}/acl", "bob", {"groups": ["physics"]})
        self.assertEqual(code, 200)
        client = await ChannelsClient.connect(self.gateway.url, kid, token=token_of("dave"))
        result = await client.execute("print('hi from', 'dave')")
        self.assertEqual(result["stdout"], "hi from dave\n")
        await client.close()
        code, _ = await self.upgrade(kid, "erin")
        self.assertEqual(code, 404)
        code, _ = await self.call("DELETE", f"api/kernels/{kid}", "dave")
        self.assertEqual(code, 204)


class OtherUsersForbidden(TokensGatewayTestCase):
    extra_settings = {"hide_kernels": "false"}

    async def test_403_when_not_hidden(self) -> None:
        """
        With hide_kernels off, another user's kernel is a 403 on the REST
        routes and the WebSocket handshake, and keeps running.
        """
        kid = (await self.gateway.start_kernel(token=token_of("alice")))["id"]
        for method, suffix in (("GET", ""), ("POST", "/restart"), ("DELETE", "")):
            code, body = await self.call(method, f"api/kernels/{kid}{suffix}", "bob")
            self.assertEqual(code, 403, body)
            self.assertIn("belongs to another user", body["message"])
        code, _ = await self.upgrade(kid, "bob")
        self.assertEqual(code, 403)
        code, model = await self.call("GET", f"api/kernels/{kid}", "alice")
        self.assertEqual((code, model["state"]), (200, "running"))
        code, _ = await self.call("DELETE", f"api/kernels/{kid}", "alice")
        self.assertEqual(code, 204)


class Revocation(TokensGatewayTestCase):
    """
    A WebSocket opened while its user had access is closed (code 4003, with
    the reason) as soon as that access ends; other users' sockets carry on.
    """

    async def shared_with_bob(self) -> tuple[str, ChannelsClient, ChannelsClient]:
        kid = (await self.gateway.start_kernel(token=token_of("alice")))["id"]
        code, _ = await self.call("PUT", f"api/kernels/{kid}/acl", "alice", {"users": ["bob"], "groups": ["physics"]})
        self.assertEqual(code, 200)
        alice = await ChannelsClient.connect(self.gateway.url, kid, token=token_of("alice"))
        bob = await ChannelsClient.connect(self.gateway.url, kid, token=token_of("bob"))
        self.assertEqual((await bob.execute("y = 1; y"))["result"]["text/plain"], "1")
        return kid, alice, bob

    async def assert_revoked(self, client: ChannelsClient, reason: str) -> None:
        closed: Deferred[None] = Deferred()
        client.closed.addBoth(lambda _: closed.callback(None) if not closed.called else None)
        await closed.addTimeout(10, reactor)
        self.assertEqual(client.close_code, 4003)
        self.assertIn(reason, client.close_reason)

    async def test_unsharing(self) -> None:
        """
        alice unshares her kernel: bob's open socket is closed and his
        session (with its journal) dropped; alice's keeps running code.
        """
        kid, alice, bob = await self.shared_with_bob()
        code, _ = await self.call("PUT", f"api/kernels/{kid}/acl", "alice", {})
        self.assertEqual(code, 200)
        await self.assert_revoked(bob, f"access to kernel {kid} was revoked")
        self.assertNotIn(bob.session, self.gateway.manager.kernels[kid].sessions)
        self.assertEqual((await alice.execute("6 * 7"))["result"]["text/plain"], "42")
        self.assertIsNone(alice.close_code)
        with self.assertRaises(ConnectionError):
            await ChannelsClient.connect(self.gateway.url, kid, token=token_of("bob"), session_id=bob.session)
        await alice.close()

    async def test_token_revoked(self) -> None:
        """
        bob's token removed from the token file, and dave taken out of the
        group the kernel is shared with: once the file is reloaded, their
        sockets are closed; alice's carries on.
        """
        kid, alice, bob = await self.shared_with_bob()
        dave = await ChannelsClient.connect(self.gateway.url, kid, token=token_of("dave"))
        users = {name: extra for name, extra in USERS.items() if name != "bob"}
        users["dave"] = {}
        write_tokens(self.tokens_file, users)
        chain = self.gateway.service.getServiceNamed("authentication")
        tokens = next(a for a in chain.authenticators if a.name == "user-tokens")
        await tokens.check()
        await self.assert_revoked(bob, "your credentials were revoked")
        await self.assert_revoked(dave, f"access to kernel {kid} was revoked")
        self.assertEqual((await alice.execute("6 * 7"))["result"]["text/plain"], "42")
        self.assertIsNone(alice.close_code)
        await alice.close()


class SessionOwnership(TokensGatewayTestCase):
    async def test_another_users_session_id(self) -> None:
        """
        bob, whom alice's kernel is shared with, presents alice's session id
        (it is in every iopub parent header): he is refused (403 naming the
        reason), alice's socket stays, and her journal is hers alone to
        resume; with his own session id he connects.
        """
        kid = (await self.gateway.start_kernel(token=token_of("alice")))["id"]
        code, _ = await self.call("PUT", f"api/kernels/{kid}/acl", "alice", {"users": ["bob"]})
        self.assertEqual(code, 200)
        alice = await ChannelsClient.connect(self.gateway.url, kid, token=token_of("alice"))
        await alice.execute("print('secret')")
        stolen = alice.session  # what bob sees in the parent headers of alice's output
        code, body = await self.upgrade(kid, "bob", stolen)
        self.assertEqual(code, 403, body)
        self.assertIn(b"belongs to another user", body)
        with self.assertRaises(ConnectionError):
            await ChannelsClient.connect(self.gateway.url, kid, token=token_of("bob"), session_id=stolen)
        self.assertIsNone(alice.close_code)
        self.assertEqual((await alice.execute("6 * 7"))["result"]["text/plain"], "42")

        await alice.close()
        with self.assertRaises(ConnectionError):
            await ChannelsClient.connect(
                self.gateway.url, kid, token=token_of("bob"), session_id=stolen, resume_after=0
            )
        again = await ChannelsClient.connect(
            self.gateway.url, kid, token=token_of("alice"), session_id=stolen, resume_after=0
        )
        await again.wait_for(lambda m: m["msg_type"] == "stream" and m["content"]["text"] == "secret\n")
        await again.close()
        bob = await ChannelsClient.connect(self.gateway.url, kid, token=token_of("bob"))
        self.assertEqual((await bob.execute("6 * 7"))["result"]["text/plain"], "42")
        self.assertEqual([m for m in bob.messages if m["msg_type"] == "stream"], [])
        await bob.close()
