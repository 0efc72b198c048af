"""The typed keys of the aiohttp application's state (``web.AppKey``), shared by the modules."""

from __future__ import annotations

from aiohttp import web
from panini import app as panini_app
from prometheus_client import CollectorRegistry

import metrics
from config import Config
from control_plane import ControlPlane
from handler import WSSManager
from keys import KeyStore
from workers import Worker

CONFIG = web.AppKey("config", Config)
PANINI = web.AppKey("panini", panini_app.App)
MANAGER = web.AppKey("manager", WSSManager)
LINK = web.AppKey("link", metrics.LinkStats)
REGISTRY = web.AppKey("registry", CollectorRegistry)
KEYS = web.AppKey("keys", KeyStore)
PLANE = web.AppKey("plane", ControlPlane)
WORKER = web.AppKey("worker", Worker)
