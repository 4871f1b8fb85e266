"""The API's endpoint groups, one ``APIRouter`` each."""
