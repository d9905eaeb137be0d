from django.urls import path

from . import views

urlpatterns = [
    path("chat", views.chat),
    path("embed", views.embed),
    path("healthz", views.healthz),
]
