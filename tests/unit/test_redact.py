"""kvmesh.redact: URLs print without their passwords, and a password on the command line is noticed."""

from kvmesh.redact import password_in_argv, redact_url


def test_passwords_are_masked_and_everything_else_kept():
    assert redact_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    assert redact_url("redis://:s3cr%40t@redis:6379/0") == "redis://:***@redis:6379/0"
    assert redact_url("rediss://user:pw@redis:6380/1") == "rediss://user:***@redis:6380/1"
    assert redact_url("redis://lonely@redis") == "redis://***@redis"
    masked = redact_url("rediss://redis:6380/0?password=pw&ssl_ca_certs=/ca.crt")
    assert "pw" not in masked.replace("/ca.crt", "") and "ssl_ca_certs=%2Fca.crt" in masked
    assert redact_url("redis://[::1") == "***"  # unparsable: nothing of it


def test_password_in_argv():
    url = "redis://:pw@redis:6379/0"
    assert password_in_argv(url, ["kvmesh", "worker", "--redis-url", url])
    assert password_in_argv(url, ["kvmesh", "worker", f"--redis-url={url}"])
    assert not password_in_argv(url, ["kvmesh", "worker"])  # from the environment
    assert not password_in_argv("redis://redis:6379/0", ["--redis-url", "redis://redis:6379/0"])
