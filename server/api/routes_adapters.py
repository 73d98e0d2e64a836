"""Routes: filled in by the HTTP issue work."""

from fastapi import APIRouter

router = APIRouter()
