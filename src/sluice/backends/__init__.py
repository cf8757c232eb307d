"""Backends: where a routed request is finally served (remote HTTP upstream, local engine)."""
