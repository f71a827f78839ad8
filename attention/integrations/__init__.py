"""Integrations with other libraries; each module imports its library and is imported only when asked for."""
