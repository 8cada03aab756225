"""Flags and their LLMSUITE_* variables, including options inside groups."""

from __future__ import annotations

from llmsuite.inference.__main__ import build_parser as inference_parser
from llmsuite.runtime.settings import EnvArgumentParser, add_server_arguments, server_settings_from_args


def test_env_vars_set_defaults_for_grouped_options_and_flags_win():
    env = {"LLMSUITE_LISTEN": "127.0.0.1:7000", "LLMSUITE_API_KEYS": "a,b", "LLMSUITE_KEEPALIVE_TIME": "12.5",
           "LLMSUITE_KEEPALIVE_PERMIT_WITHOUT_CALLS": "false"}
    parser = EnvArgumentParser(environ=env)
    add_server_arguments(parser, default_listen="0.0.0.0:1")
    settings = server_settings_from_args(parser.parse_args([]), service_name="t")
    assert settings.listen == "127.0.0.1:7000" and settings.api_keys == ("a", "b")
    assert settings.keepalive.time_s == 12.5 and settings.keepalive.permit_without_calls is False
    assert server_settings_from_args(parser.parse_args(["--listen", "h:1"]), service_name="t").listen == "h:1"
    assert "LLMSUITE_KEEPALIVE_TIME" in " ".join(parser.format_help().split())


def test_repeatable_model_flag_reads_a_comma_separated_variable(monkeypatch):
    monkeypatch.setenv("LLMSUITE_MODEL", "a=/m/a,b=/m/b")
    monkeypatch.setenv("LLMSUITE_DEVICE", "cpu")
    args = inference_parser().parse_args([])
    assert args.model == ["a=/m/a", "b=/m/b"] and args.device == "cpu"


def test_a_repeatable_flag_replaces_its_variable_instead_of_adding_to_it(monkeypatch):
    monkeypatch.setenv("LLMSUITE_MODEL", "a=/m/a,b=/m/b")
    parser = inference_parser()
    assert parser.parse_args(["--model", "c=/m/c"]).model == ["c=/m/c"]
    assert parser.parse_args(["--model", "c=/m/c", "--model", "d=/m/d"]).model == ["c=/m/c", "d=/m/d"]
    assert parser.parse_args([]).model == ["a=/m/a", "b=/m/b"]  # and the variable is intact for the next parse
