"""``openglm accounts|keys|prices`` against a real database, through the same entry point users run."""

from __future__ import annotations

import pytest

from openglm.cli import main
from openglm.errors import OpenGLMError
from openglm.serve.admin_cli import format_amount, parse_amount
from openglm.serve.store import AuthError, Store


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_amounts_are_exact():
    assert parse_amount("12.5") == 12_500_000 and parse_amount("0.000001") == 1 and parse_amount("3") == 3_000_000
    assert format_amount(12_500_001) == "12.500001" and format_amount(-1) == "-0.000001"
    for bad in ("1.0000001", "-1", "abc", "nan", "inf"):
        with pytest.raises(OpenGLMError):
            parse_amount(bad)


def test_accounts_keys_prices(capsys, db_url):
    db = ["--db", db_url]
    assert _run(capsys, "accounts", "create", "acme", "--balance", "2.5", *db)[0] == 0
    code, out, _ = _run(capsys, "accounts", "top-up", "acme", "0.5", *db)
    assert code == 0 and "3.000000" in out
    code, out, err = _run(capsys, "keys", "create", "acme", "--name", "ci", "--models", "glm-tiny", "--rpm", "7",
                          "--expires-in", "1", *db)
    secret = out.strip()
    assert code == 0 and secret.startswith("sk-glm-") and "shown only now" in err
    code, out, _ = _run(capsys, "prices", "set", "glm-tiny", "1", "2.5", *db)
    assert code == 0

    with Store(db_url) as store:
        key = store.authenticate(secret)
        assert (key.name, key.models, key.rpm, key.expires_at is not None) == ("ci", ["glm-tiny"], 7, True)
        assert store.get_account(key.account_id).balance == 3_000_000
        assert store.get_price("glm-tiny") == (1_000_000, 2_500_000)
        store.settle(store.reserve(key, "glm-tiny", None, 100, 100, False), 100, 40, "stop", 5)

    code, out, _ = _run(capsys, "keys", "list", "--account", "acme", *db)
    assert code == 0 and key.prefix in out and "active" in out and secret not in out
    code, out, _ = _run(capsys, "accounts", "show", "acme", *db)
    assert code == 0 and "1 requests, 100 prompt + 40 completion tokens, cost 0.000200" in out
    assert "2.999800" in out
    code, out, _ = _run(capsys, "accounts", "show", *db)
    assert code == 0 and "acme" in out
    code, out, _ = _run(capsys, "prices", "list", *db)
    assert code == 0 and "2.500000" in out

    assert _run(capsys, "keys", "revoke", str(key.id), *db)[0] == 0
    assert "revoked" in _run(capsys, "keys", "list", *db)[1]
    with Store(db_url) as store, pytest.raises(AuthError):
        store.authenticate(secret)


def test_errors_are_messages_not_tracebacks(capsys, tmp_path):
    db = ["--db", f"sqlite:///{tmp_path / 'x.db'}"]
    code, _, err = _run(capsys, "accounts", "show", "nobody", *db)
    assert code == 1 and err.startswith("openglm: error: no account named 'nobody'")
    code, _, err = _run(capsys, "keys", "revoke", "42", *db)
    assert code == 1 and "no key with id 42" in err
    assert _run(capsys, "accounts", "create", "acme", *db)[0] == 0
    code, _, err = _run(capsys, "accounts", "create", "acme", *db)
    assert code == 1 and "already exists" in err
    with pytest.raises(SystemExit):
        main(["accounts", "top-up", "acme", "1.0000001", *db])
    assert "at most 6 decimals" in capsys.readouterr().err
