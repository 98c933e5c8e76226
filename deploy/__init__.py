"""Deployment files and the tools that write them (deploy/lock.py)."""
