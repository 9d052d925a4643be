"""rectiflow.models"""
