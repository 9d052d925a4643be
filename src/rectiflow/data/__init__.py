"""rectiflow.data"""
