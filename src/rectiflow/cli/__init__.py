"""rectiflow.cli"""
