"""Routing: from a public model name to the deployment that serves a request."""
