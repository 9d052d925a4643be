"""rectiflow.flow"""
