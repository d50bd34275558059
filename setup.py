from setuptools import find_packages, setup


def readme() -> str:
    with open('README.md', encoding='utf-8') as f:
        return f.read()


setup(
    name='mmfusionload',
    version='0.1.0',
    description='Per-modality, layout-aware checkpoint loading for MMDetection3D '
    'and MMDetection (BEVFusion, EfficientViT).',
    long_description=readme(),
    long_description_content_type='text/markdown',
    packages=find_packages(include=['mmfusionload', 'mmfusionload.*']),
    package_data={'mmfusionload': ['configs/**/*.py', 'report/page.html', 'report/page.js']},
    python_requires='>=3.8',
    install_requires=['mmengine>=0.10.0', 'rich'],
    extras_require={'safetensors': ['safetensors']},
    entry_points={'console_scripts': ['mmfusionload=mmfusionload.cli:main']},
)
