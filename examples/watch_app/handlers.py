"""Request handling: edit and save this file while the server runs."""

import state

GREETING = "hello"


def respond(path: str) -> tuple[int, str]:
    state.visits += 1
    if path == "/health":
        return 200, "ok\n"
    return 200, render(path)


def render(path: str) -> str:
    return f"{GREETING} from {path} (visit {state.visits})\n"
