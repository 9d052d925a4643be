"""rectiflow.convert"""
