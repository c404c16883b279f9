"""``kvmesh chat``: an interactive conversation with the served model, streamed as it is written.

Talks to a gateway or a worker (the same ``Inference`` API). The whole history goes with every
turn, so the prefix cache serves what was already said. Lines read from a pipe work too, which
makes a scripted conversation (and its test) possible::

    printf 'What is the capital of France?\\n/exit\\n' | kvmesh chat --temperature 0
"""

from __future__ import annotations

import argparse
import sys
from typing import TextIO

import grpc

from kvmesh.client import add_sampling_flags, describe_error, request_from_args
from kvmesh.tls import api_key_from_env, client_tls
from kvmesh.v1 import inference_pb2, inference_pb2_grpc

HELP = """Commands:
  /exit, /bye     leave (so does Ctrl-D)
  /clear          forget the conversation (keeps the system message)
  /system TEXT    set the system message and start over
  /help           this list
Ctrl-C stops an answer being written."""


def configure(parser: argparse.ArgumentParser) -> None:
    add_sampling_flags(parser)


class Chat:
    def __init__(self, args: argparse.Namespace, stub: inference_pb2_grpc.InferenceStub, out: TextIO) -> None:
        self.args = args
        self.stub = stub
        self.out = out
        self.history: list[dict[str, str]] = []

    def messages(self) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.args.system}] if self.args.system else []
        return system + self.history

    def command(self, line: str) -> bool:
        """Runs a /command; False when the chat should end."""
        name, _, rest = line.partition(" ")
        if name in ("/exit", "/bye", "/quit"):
            return False
        if name == "/clear":
            self.history.clear()
            print("(conversation cleared)", file=self.out)
        elif name == "/system":
            self.args.system = rest.strip() or None
            self.history.clear()
            print("(system message set; conversation cleared)", file=self.out)
        else:
            print(HELP, file=self.out)
        return True

    def turn(self, text: str) -> None:
        """Sends the conversation plus ``text``; streams the answer and keeps it in the history.
        An answer that fails or is interrupted leaves the history as it was."""
        messages = [*self.messages(), {"role": "user", "content": text}]
        request = request_from_args(self.args, None, messages=messages)
        call = self.stub.Generate(request, timeout=self.args.timeout)
        answer = []
        try:
            for response in call:
                answer.append(response.text)
                self.out.write(response.text)
                self.out.flush()
        except KeyboardInterrupt:
            call.cancel()
            print("\n(stopped)", file=self.out)
            return
        finally:
            if answer:
                self.out.write("\n")
        self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": "".join(answer)}]


def read_line(interactive: bool) -> str | None:
    try:
        return input(">>> ") if interactive else sys.stdin.readline() or None
    except EOFError:
        return None


def run(args: argparse.Namespace) -> int:
    interactive = sys.stdin.isatty()
    if interactive:
        import readline  # noqa: F401  (line editing and history for input())
    try:
        channel = client_tls(args).sync_channel(args.target, api_key_from_env())
    except (OSError, ValueError) as e:  # an unreadable certificate, an API key without TLS
        print(f"error: {e}", file=sys.stderr)
        return 2
    with channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        try:
            models = stub.ListModels(inference_pb2.ListModelsRequest(), timeout=10).models
        except grpc.RpcError as e:
            print(describe_error(e, args.target), file=sys.stderr)
            return 1
        name = args.model or (models[0].id if models else "?")
        if interactive:
            print(f"Chatting with {name} at {args.target}. /help for commands, /exit to leave.")
        chat = Chat(args, stub, sys.stdout)
        while True:
            try:
                line = read_line(interactive)
            except KeyboardInterrupt:
                print()
                return 0
            if line is None:
                return 0
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                if not chat.command(line):
                    return 0
                continue
            try:
                chat.turn(line)
            except grpc.RpcError as e:
                print(describe_error(e, args.target), file=sys.stderr)
                if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND):
                    return 1
