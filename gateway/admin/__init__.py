"""The admin API and its web page, served on their own listener."""

from gateway.admin.routes import STORE_KEY, create_admin_app

__all__ = ["STORE_KEY", "create_admin_app"]
