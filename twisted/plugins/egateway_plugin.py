from twisted.application.service import ServiceMaker

egateway = ServiceMaker("egateway", "egateway.tap", "Jupyter kernel gateway", "egateway")
