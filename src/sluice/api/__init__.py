"""The HTTP surface: OpenAI routes, health and metrics, middleware and error rendering."""
