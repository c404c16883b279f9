"""One way to print a URL that may carry credentials: every log line naming a Redis (or any)
URL passes it through ``redact_url``, so a password given inside a URL never reaches a log."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

MASK = "***"
SECRET_PARAMS = {"password", "pass", "token", "secret"}


def redact_url(url: str) -> str:
    """``url`` with the password of its user part and any password-like query value masked."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return MASK  # unparsable: print nothing of it rather than a secret
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, host = netloc.rpartition("@")
        user, colon, _ = userinfo.partition(":")
        # A lone user part is masked too: clients differ on whether ``redis://secret@host`` is a user.
        netloc = f"{user}:{MASK}@{host}" if colon else f"{MASK}@{host}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, MASK if k.lower() in SECRET_PARAMS else v) for k, v in pairs], safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def password_in_argv(url: str, argv: list[str]) -> bool:
    """Whether ``url`` carries a password and was given on the command line (visible in ``ps``)."""
    try:
        has_password = bool(urlsplit(url).password)
    except ValueError:
        return False
    return has_password and any(url in arg for arg in argv)


ARGV_WARNING = (
    "The Redis password is on the command line, where ps shows it: give the URL in KVMESH_REDIS_URL "
    "and the password in KVMESH_REDIS_PASSWORD_FILE (or KVMESH_REDIS_PASSWORD) instead"
)
