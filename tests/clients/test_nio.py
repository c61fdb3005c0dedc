"""matrix-nio (from PyPI) against a real Convo: register with a registration token,
log in, whoami, profile, devices, log out."""

import asyncio

import pytest
from nio import (
    AsyncClient,
    LoginError,
    LoginResponse,
    LogoutResponse,
    ProfileGetResponse,
    RegisterResponse,
    WhoamiError,
    WhoamiResponse,
)

PASSWORD = "Correct-Horse-42"


def run(coro):
    return asyncio.run(coro)


def test_register_login_profile_logout(convo):
    token = convo.admin("registration-token", "create", "--uses", "1")

    async def scenario():
        client = AsyncClient(convo.url, "alice")
        try:
            # Registration with a token (three requests: flows, token stage, dummy stage).
            resp = await client.register_with_token("alice", PASSWORD, token, device_name="nio test")
            assert isinstance(resp, RegisterResponse), resp
            assert resp.user_id == "@alice:localhost"
            assert resp.access_token and resp.device_id

            # The single-use token is spent now.
            other = AsyncClient(convo.url, "bob")
            again = await other.register_with_token("bob", PASSWORD, token)
            assert not isinstance(again, RegisterResponse)
            await other.close()

            # Password login on a fresh client.
            client2 = AsyncClient(convo.url, "@alice:localhost")
            login = await client2.login(PASSWORD, device_name="second device")
            assert isinstance(login, LoginResponse), login
            assert login.device_id != resp.device_id

            who = await client2.whoami()
            assert isinstance(who, WhoamiResponse), who
            assert who.user_id == "@alice:localhost"
            assert who.device_id == login.device_id

            # Profile: the display name starts as the localpart, then changes.
            profile = await client2.get_profile()
            assert isinstance(profile, ProfileGetResponse), profile
            assert profile.displayname == "alice"
            await client2.set_displayname("Alice Liddell")
            await client2.set_avatar("mxc://localhost/avatar123")
            profile = await client2.get_profile("@alice:localhost")
            assert profile.displayname == "Alice Liddell"
            assert profile.avatar_url == "mxc://localhost/avatar123"
            displayname = await client.get_displayname("@alice:localhost")
            assert displayname.displayname == "Alice Liddell"

            # Both devices are listed, with their names.
            devices = await client2.devices()
            names = sorted(d.display_name for d in devices.devices)
            assert names == ["nio test", "second device"], names

            # A wrong password fails.
            bad = AsyncClient(convo.url, "alice")
            wrong = await bad.login("Wrong-Password-1")
            assert isinstance(wrong, LoginError)
            assert wrong.status_code == "M_FORBIDDEN"
            await bad.close()

            # Logging out invalidates the token.
            out = await client2.logout()
            assert isinstance(out, LogoutResponse), out
            client2.access_token = login.access_token
            who = await client2.whoami()
            assert isinstance(who, WhoamiError)
            assert who.status_code == "M_UNKNOWN_TOKEN"
            await client2.close()

            # The first device still works.
            who = await client.whoami()
            assert isinstance(who, WhoamiResponse), who
        finally:
            await client.close()

    run(scenario())


def test_registration_refuses_bad_input(convo):
    token = convo.admin("registration-token", "create")

    async def scenario():
        client = AsyncClient(convo.url, "x")
        try:
            weak = await client.register_with_token("carol", "weak", token)
            assert not isinstance(weak, RegisterResponse)
            assert weak.status_code == "M_WEAK_PASSWORD", weak
            bad_name = await client.register_with_token("Carol Smith", PASSWORD, token)
            assert bad_name.status_code == "M_INVALID_USERNAME", bad_name
            bad_token = await client.register_with_token("carol", PASSWORD, "not-a-token")
            assert not isinstance(bad_token, RegisterResponse)
            ok = await client.register_with_token("carol", PASSWORD, token)
            assert isinstance(ok, RegisterResponse), ok
            taken = await client.register_with_token("carol", PASSWORD, token)
            assert taken.status_code == "M_USER_IN_USE", taken
        finally:
            await client.close()

    run(scenario())
