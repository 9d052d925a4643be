"""rectiflow.nn"""
